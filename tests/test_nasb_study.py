"""The NASB reproduction's baselines: random search within a budget, the summary's best of K."""

from __future__ import annotations

import json

import pytest

from benchmarks import nasb_study

TARGET = 1.64e8


def test_random_search_scores_matched_random_cells_until_the_budget_is_spent(tmp_path, capsys):
    out = tmp_path / "rs.jsonl"
    argv = ["random-search", "--dataset", "digits", "--out", str(out), "--threads", "1"]
    argv += ["--proxy-epochs", "1"]
    assert nasb_study.main([*argv, "--budget-s", "0.001", "--target-ops", str(TARGET)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1  # the first draw spends the whole budget
    row = rows[0]
    assert row["index"] == 0 and row["proxy_epochs"] == 1
    assert abs(row["ops_224"] / TARGET - 1) <= 0.05  # held to the baselines' cost
    assert 0.0 <= row["held_out_accuracy"] <= 1.0
    from models.nasb import Genotype, random_genotype

    assert Genotype.load(row["genotype"]) == random_genotype(0)
    # a rerun with the budget spent adds nothing; a larger budget goes on from draw 1
    assert nasb_study.main([*argv, "--budget-s", "0.001"]) == 0
    assert len(out.read_text().splitlines()) == 1
    assert nasb_study.main([*argv, "--budget-s", str(row["seconds"] + 0.001)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["genotype"] != rows[0]["genotype"]


def test_random_search_needs_a_budget(tmp_path):
    with pytest.raises(SystemExit):
        nasb_study.main(["random-search", "--out", str(tmp_path / "rs.jsonl")])


def test_summary_reads_off_the_best_of_the_random_cells(tmp_path, capsys):
    def row(config, seed, accuracy):
        return {
            "config": config,
            "seed": seed,
            "accuracy": accuracy,
            "ops_224": TARGET,
            "images_per_s": 100.0,
        }

    rows = [
        row("rand_0", 0, 0.50),
        row("rand_1", 0, 0.70),
        row("rand_1", 1, 0.60),
        row("rand_1", 2, 0.62),
        row("nasb_a", 0, 0.75),
        row("random_search", 0, 0.9),
    ]
    baselines = tmp_path / "sofar.jsonl"
    baselines.write_text(json.dumps(row("bireal18", 0, 0.74)) + "\n")
    out = tmp_path / "nasb.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert nasb_study.main(["summary", "--out", str(out), "--baselines", str(baselines)]) == 0
    text = capsys.readouterr().out
    assert "| bireal18 |" in text and "| nasb_a |" in text
    assert "best of the random genotypes (by seed 0): rand_1, 0.640 +- 0.053 over 3 seeds" in text
