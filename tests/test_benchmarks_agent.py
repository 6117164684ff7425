"""The agent benchmarks package: every module imports, and the smallest real parts run.

The runs go through the benchmark's own CLI (``python -m benchmarks.agent`` as a function
call), its own Mosquitto helper and its receiver worker process, with tiny sizes.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: it runs from the checkout
    sys.path.insert(0, str(ROOT))

import benchmarks.agent  # noqa: E402
from benchmarks.agent import __main__ as cli  # noqa: E402
from benchmarks.agent import common  # noqa: E402


def test_every_module_imports_and_each_part_has_a_module() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.agent.__path__))
    assert {"common", "probes", "rss", "learn_rss", "latency", "throughput", "fleet"} <= set(names)
    for name in names:
        importlib.import_module(f"benchmarks.agent.{name}")
    assert set(cli.PARTS) == {"rss", "learn-rss", "latency", "throughput", "fleet"}
    for module in cli.PARTS.values():
        assert callable(module.run) and callable(module.summarize)


def test_worker_argv_turns_keywords_into_flags(tmp_path: Path) -> None:
    argv = common.worker_argv(
        "fleet", "fleet", work=tmp_path, first=3, shards={"a003": "d"}, nodelay=True, off=False
    )
    assert argv[1:5] == ["-m", "benchmarks.agent.fleet", "--worker", "fleet"]
    assert argv[5:] == [
        "--work",
        str(tmp_path),
        "--first",
        "3",
        "--shards",
        '{"a003": "d"}',
        "--nodelay",
    ]


def test_import_probe_runs_in_a_fresh_interpreter() -> None:
    memory = json.loads(common.python_output(common.probe_argv("imports", "json")))
    assert set(memory) == {"VmRSS_mb", "VmHWM_mb", "RssAnon_mb", "RssFile_mb", "threads"} | {
        "torch_loaded"
    }
    assert 0 < memory["VmRSS_mb"] < 100 and memory["torch_loaded"] is False


def _run(tmp_path: Path, *flags: str) -> list[dict]:
    out = tmp_path / "out.jsonl"
    argv = ["--workdir", str(tmp_path / "work"), "--out", str(out), "--no-nodelay-variant"]
    assert cli.main([*argv, *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_latency_part_runs_against_a_real_mosquitto(tmp_path: Path, capsys) -> None:
    records = _run(tmp_path, "--part", "latency", "--repeats", "3", "--warmup", "1")
    assert records[0]["part"] == "machine" and records[-1]["what"] == "done"
    measured = {r["model"]: r for r in records if "model" in r}
    assert set(measured) == {"1MiB", "1KiB"}
    one_mib = measured["1MiB"]
    assert one_mib["tcp"] == common.TCP_LABEL[True]
    assert one_mib["chunks"] == 5 and one_mib["frame_bytes"] > 2**20
    assert set(one_mib["publish_to_decoded_ms"]) == {"p50", "p95", "max"}
    assert 0 < one_mib["publish_to_decoded_ms"]["p50"] <= one_mib["publish_to_decoded_ms"]["max"]
    assert measured["1KiB"]["chunks"] == 1 and measured["1KiB"]["repeats"] == 3
    drops = [r for r in records if r.get("what") == "receiver drops"]
    assert drops == [
        {"part": "latency", "tcp": common.TCP_LABEL[True], "what": "receiver drops", "drops": {}}
    ]
    assert "latency  [as shipped" in capsys.readouterr().out  # the summary


def test_throughput_part_runs_against_a_real_mosquitto(tmp_path: Path) -> None:
    records = _run(
        tmp_path,
        "--part",
        "throughput",
        "--payload-mb",
        "1",
        "--throughput-repeats",
        "2",
        "--burst-mb",
        "0",
        "--chunk-bytes",
        str(128 * 1024),
    )
    (measured,) = [r for r in records if "mib_per_s_publish_to_verified" in r]
    assert measured["chunks"] == 9 and measured["chunk_bytes"] == 128 * 1024
    assert len(measured["mib_per_s_publish_to_verified"]["runs"]) == 2
    assert measured["mib_per_s_incl_seal_split"] > 0
    assert not [r for r in records if str(r.get("what", "")).startswith("burst")]
