"""``compress``: a trained float teacher in, a distilled low-bit or binary student out, no data.

The run, in order (each phase with its own step count, progress bar and seed):

1. **data source**: ``gdfq`` trains GDFQ's generator with the reconstruction loss;
   ``autorecon`` searches a generator supernet for ``search_epochs`` x
   :data:`SEARCH_STEPS_PER_EPOCH` steps (on batches of ``search_batch_size``: every candidate
   runs at once, which makes a supernet step cost several generator steps), derives its
   genotype and retrains that generator from scratch for ``generator_steps`` (given a
   ``genotype``, e.g. another run's ``generator.json``, it skips the search); ``zeroq``
   optimises a pool of :data:`ZEROQ_BATCHES` batches of inputs for the batch-norm statistics
   loss, ``generator_steps`` in all.
2. **student** (:mod:`.students`), distilled for ``steps`` steps from the teacher on batches
   drawn from the source (fresh generator samples every step, or the ZeroQ pool reshuffled) by
   :func:`models.training.train_steps`, the one training step of the toolkit: temperature-scaled
   KL at T = 20 (GDFQ's public code) plus, for an int student, 0.1 x its own batch-norm
   statistics loss toward the teacher's running statistics.
3. **output**: the student as a normal checkpoint (``bitfleet eval`` / ``bitfleet export`` take
   it; its metadata carries the teacher's normalisation, classes and image size), plus
   ``samples.png``, ``compress.json`` and, for ``autorecon``, ``generator.json`` and
   ``alphas.png``.

Nothing here opens a dataset: the teacher's checkpoint holds all the run needs.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitfleet.checkpoint import recorded_input_shape
from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_json, atomic_write_text
from models import checkpoint
from models.training import BatchSampler, cosine_schedule, freeze, make_optimizer, train_steps

from ..progress import step_progress
from ..search.plot import plot_alphas
from .autorecon import GENERATOR_OPS, GeneratorGenotype, SearchedGenerator
from .bn_stats import BNStatistics, NoBatchNormError, batch_norm_layers
from .fit import FitStats, fit_generator, fit_inputs
from .generators import ConditionalGenerator, GDFQGenerator
from .samples import sample_grid, write_sample_grid
from .students import STUDENTS, make_student, uses_student_bn_loss

__all__ = [
    "GENERATORS",
    "SEARCH_STEPS_PER_EPOCH",
    "ZEROQ_BATCHES",
    "CompressConfig",
    "CompressResult",
    "TeacherError",
    "compress",
    "distill",
]

#: ``--generator`` choices.
GENERATORS = ("autorecon", "gdfq", "zeroq")
#: Alpha + weight step pairs in one search epoch of the generator supernet.
SEARCH_STEPS_PER_EPOCH = 50
#: Batches in ZeroQ's pool of distilled inputs.
ZEROQ_BATCHES = 4
#: GDFQ's public code distils at this temperature.
TEMPERATURE = 20.0

# What a teacher's metadata passes on to the student's (all the data facts eval/export read).
_DATA_META = ("dataset", "data_root", "channels", "image_size", "classes", "mean", "std")


class TeacherError(BitfleetError, ValueError):
    """A teacher the chosen compression cannot use."""


@dataclass
class CompressConfig:
    """Everything that determines a compression run (saved as ``compress.json``)."""

    teacher: str
    to: str = "int8"
    generator: str = "gdfq"
    search_epochs: int = 2
    generator_steps: int = 300
    steps: int = 600
    batch_size: int = 64
    search_batch_size: int = 16
    genotype: dict[str, Any] | None = None
    lr: float | None = None
    generator_lr: float = 1e-3
    bn_weight: float = 0.1
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.to not in STUDENTS:
            raise ValueError(f"unknown student --to {self.to!r}; use one of {', '.join(STUDENTS)}")
        if self.generator not in GENERATORS:
            raise ValueError(
                f"unknown --generator {self.generator!r}; use one of {', '.join(GENERATORS)}"
            )
        for name in ("search_epochs", "generator_steps", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "search_batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name} must be >= 2 (batch norm needs it), got {getattr(self, name)}"
                )
        for name in ("generator_lr", "bn_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.genotype is not None:
            if self.generator != "autorecon":
                raise ValueError("a generator genotype is for --generator autorecon only")
            GeneratorGenotype.from_dict(self.genotype)  # a bad one fails here, in one line

    @property
    def student_lr(self) -> float:
        """The student's Adam learning rate: 1e-4 to fine-tune an int student, 1e-3 binary."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.to == "bireal18" else 1e-4


@dataclass
class CompressResult:
    """What a finished compression reports (``--json``)."""

    out: Path
    generator: str
    student: str
    teacher: str
    teacher_accuracy: float | None
    genotype: dict[str, Any] | None
    fit: dict[str, float]
    distill: dict[str, float]
    seconds: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


def _load_teacher(path: str) -> checkpoint.Checkpoint:
    try:
        ckpt = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"cannot read the teacher: {err}") from None
    freeze(ckpt.model)
    return ckpt


def _image_shape(ckpt: checkpoint.Checkpoint) -> tuple[int, int, int]:
    shape = recorded_input_shape(ckpt.spec, ckpt.meta)
    if shape is None:
        raise TeacherError(
            f"the teacher {ckpt.path} records no input shape (channels, image_size in its "
            "metadata); compress a checkpoint written by `bitfleet train`"
        )
    return shape


def _num_classes(ckpt: checkpoint.Checkpoint) -> int:
    classes = ckpt.spec.get("args", {}).get("num_classes")
    if classes is None:
        classes = len(ckpt.meta.get("classes", [])) or None
    if classes is None:
        raise TeacherError(f"the teacher {ckpt.path} records no number of classes")
    return int(classes)


def _check_batch_norm(teacher: nn.Module, generator: str) -> bool:
    """Whether the teacher has BN statistics; ZeroQ, which matches nothing else, needs them."""
    if batch_norm_layers(teacher):
        return True
    if generator == "zeroq":
        raise NoBatchNormError(
            "the teacher has no batch-norm layers, so ZeroQ's statistics loss has nothing to "
            "match; use --generator gdfq or --generator autorecon (they then train on the "
            "teacher's cross-entropy alone)"
        )
    return False


class _Phases:
    """One rich progress bar per phase (on stderr), or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> _Phases:
        if self.enabled:
            self._progress = step_progress("{task.description:<10}", stderr=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def phase(self, name: str, total: int) -> Any:
        """``on_step(step, loss, ...)`` advancing a new bar of ``total`` steps."""
        if self._progress is None:
            return None
        task = self._progress.add_task(name, total=total, status="")

        def on_step(step: int, loss: float, *_: Any) -> None:
            self._progress.update(task, advance=1, status=f"loss {loss:.3f}")

        return on_step


class _Source:
    """Batches for the student: fresh generator samples, or the ZeroQ pool reshuffled."""

    def __init__(
        self,
        generator: ConditionalGenerator | None = None,
        pool: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.generator, self.pool = generator, pool

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches without end (the distillation takes as many as it has steps)."""
        if self.pool is not None:
            sampler = BatchSampler(self.pool[0], self.pool[1], batch_size)
            yield from sampler.endless(np.random.default_rng(seed))
            return
        assert self.generator is not None
        rng = torch.Generator().manual_seed(seed)
        self.generator.train()  # its batch norms normalise each batch, as when it was fitted
        while True:
            with torch.no_grad():  # left before the yield: grad mode is global, not per frame
                batch = self.generator.sample(batch_size, rng)
            yield batch

    def preview(self, per_class: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
        """Images to draw in ``samples.png``: ``per_class`` of each class where possible."""
        if self.pool is not None:
            return self.pool
        assert self.generator is not None
        shown = min(num_classes, 10)
        labels = torch.arange(shown).repeat_interleave(per_class)
        z = torch.randn(
            len(labels), self.generator.latent_dim, generator=torch.Generator().manual_seed(seed)
        )
        self.generator.train()
        with torch.no_grad():
            return self.generator(z, labels), labels


def _search_generator(
    config: CompressConfig,
    teacher: nn.Module,
    common: dict[str, Any],
    fit_args: dict[str, Any],
    phases: _Phases,
    out: Path,
) -> GeneratorGenotype:
    """AutoReCon's search: the supernet's weights and alphas, then its derived genotype."""
    torch.manual_seed(config.seed)
    supernet = SearchedGenerator(**common)
    on_step = phases.phase("search", config.search_epochs * SEARCH_STEPS_PER_EPOCH)
    history = [supernet.mean_weights()]
    for epoch in range(config.search_epochs):
        fit_generator(
            supernet,
            teacher,
            SEARCH_STEPS_PER_EPOCH,
            arch_parameters=supernet.arch_parameters(),
            seed=config.seed * 1000 + epoch,
            on_step=on_step,
            **(fit_args | {"batch_size": config.search_batch_size}),
        )
        history.append(supernet.mean_weights())
    plot_alphas(history, GENERATOR_OPS, out / "alphas.png", panels=_CELL_PANELS)
    return supernet.derive()


def _fit_source(
    config: CompressConfig,
    teacher: nn.Module,
    shape: tuple[int, int, int],
    num_classes: int,
    use_bn: bool,
    phases: _Phases,
    out: Path,
) -> tuple[_Source, FitStats, dict[str, Any] | None, dict[str, float]]:
    """Phase 1: the data source of ``config.generator`` (see the module doc)."""
    channels, size, _ = shape
    seconds: dict[str, float] = {}
    genotype: dict[str, Any] | None = None
    common: dict[str, Any] = {"num_classes": num_classes, "image_size": size, "channels": channels}
    fit_args: dict[str, Any] = {
        "batch_size": config.batch_size,
        "lr": config.generator_lr,
        "bn_weight": config.bn_weight,
        "use_bn": use_bn,
    }
    if config.generator == "zeroq":
        started = time.perf_counter()
        per_batch = max(1, config.generator_steps // ZEROQ_BATCHES)
        on_step = phases.phase("zeroq", per_batch * ZEROQ_BATCHES)
        images, losses = [], []
        for index in range(ZEROQ_BATCHES):
            x, stats = fit_inputs(
                teacher,
                (config.batch_size, *shape),
                per_batch,
                seed=config.seed * 1000 + index,
                on_step=on_step,
            )
            images.append(x)
            losses.extend(stats.losses)
        pool_x = torch.cat(images)
        with torch.no_grad():
            pool_y = teacher(pool_x).argmax(1)
        seconds["source"] = time.perf_counter() - started
        return _Source(pool=(pool_x, pool_y)), FitStats(losses, float("nan")), None, seconds

    generator: ConditionalGenerator
    if config.generator == "autorecon":
        if config.genotype is not None:
            found = GeneratorGenotype.from_dict(config.genotype)  # given: no search
        else:
            started = time.perf_counter()
            found = _search_generator(config, teacher, common, fit_args, phases, out)
            seconds["search"] = time.perf_counter() - started
        genotype = found.to_dict()
        atomic_write_text(out / "generator.json", found.to_json())
        torch.manual_seed(config.seed + 1)
        generator = SearchedGenerator(**common, genotype=found)
    else:
        torch.manual_seed(config.seed)
        generator = GDFQGenerator(**common)
    started = time.perf_counter()
    stats = fit_generator(
        generator,
        teacher,
        config.generator_steps,
        seed=config.seed * 1000 + 999,
        on_step=phases.phase("generator", config.generator_steps),
        **fit_args,
    )
    seconds["generator"] = time.perf_counter() - started
    return _Source(generator=generator), stats, genotype, seconds


_CELL_PANELS = {"cell1": "cell 1", "cell2": "cell 2", "cell3": "cell 3"}


def compress(
    config: CompressConfig, out: str | os.PathLike[str], *, progress: bool = True
) -> CompressResult:
    """Run a data-free compression (see the module doc) and write its checkpoint to ``out``.

    Raises:
        CheckpointError: the teacher checkpoint is missing, torn or unreadable.
        NoBatchNormError: ZeroQ asked of a teacher without batch norm.
        TeacherError: the teacher records no input shape or classes.
        FileExistsError: ``out`` already holds a checkpoint.
    """
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise NotADirectoryError(f"{out_path} is a file, not a folder; choose another --out")
    if (out_path / checkpoint.SPEC_FILE).exists():
        raise FileExistsError(f"{out_path} already holds a checkpoint; choose another --out")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ckpt = _load_teacher(config.teacher)
    teacher = ckpt.model
    shape, num_classes = _image_shape(ckpt), _num_classes(ckpt)
    use_bn = _check_batch_norm(teacher, config.generator)
    student = make_student(config.to, teacher)
    out_path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path / "compress.json", asdict(config))

    with _Phases(progress) as phases:
        source, fit_stats, genotype, seconds = _fit_source(
            config, teacher, shape, num_classes, use_bn, phases, out_path
        )
        started = time.perf_counter()
        batches = source.batches(config.batch_size, config.seed * 1000 + 7)
        distilled = distill(
            config,
            teacher,
            student,
            batches,
            use_bn=use_bn,
            on_step=phases.phase("student", config.steps),
        )
        seconds["distill"] = time.perf_counter() - started

    teacher_accuracy = ckpt.meta.get("metrics", {}).get("test_accuracy")
    meta = {k: ckpt.meta[k] for k in _DATA_META if k in ckpt.meta}
    meta |= {
        "datafree": {
            "teacher": str(ckpt.path),
            "teacher_accuracy": teacher_accuracy,
            "generator": config.generator,
            "student": config.to,
            "steps": config.steps,
        }
    }
    checkpoint.save(student, out_path, **meta)
    images, labels = source.preview(8, num_classes, config.seed)
    mean = ckpt.meta.get("mean", [0.0] * shape[0])
    std = ckpt.meta.get("std", [1.0] * shape[0])
    write_sample_grid(sample_grid(images, labels, mean, std), out_path / "samples.png")
    files = {"checkpoint": str(out_path), "samples": str(out_path / "samples.png")}
    if genotype is not None:
        files["genotype"] = str(out_path / "generator.json")
    if (out_path / "alphas.png").is_file():
        files["alphas"] = str(out_path / "alphas.png")
    result = CompressResult(
        out=out_path,
        generator=config.generator,
        student=config.to,
        teacher=str(ckpt.path),
        teacher_accuracy=float(teacher_accuracy) if teacher_accuracy is not None else None,
        genotype=genotype,
        fit={
            "first_loss": fit_stats.first,
            "last_loss": fit_stats.last,
            "teacher_agreement": fit_stats.accuracy,
        },
        distill=distilled,
        seconds=seconds,
        files=files,
    )
    atomic_write_json(out_path / "compress.json", asdict(config) | {"result": result.to_dict()})
    return result


def distill(
    config: CompressConfig,
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    use_bn: bool = True,
    on_step: Callable[[int, float, int], None] | None = None,
) -> dict[str, float]:
    """Distil ``student`` from ``teacher`` on ``batches`` (``config.steps`` of them).

    The loss is KL at temperature :data:`TEMPERATURE` (times T squared) plus, for an int
    student of a teacher with batch norm, ``config.bn_weight`` times the student's batch-norm
    statistics loss toward the running statistics it started with (the teacher's). A
    compression feeds it generated batches; the data-free study feeds it real ones, the same
    way, for the upper bound.
    """
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(student, "adam", config.student_lr)
    student_bns = (
        BNStatistics(student, frozen=True)
        if use_bn and uses_student_bn_loss(config.to) and batch_norm_layers(student)
        else None
    )
    extra = (lambda: config.bn_weight * student_bns.loss()) if student_bns is not None else None
    if student_bns is not None:
        student_bns.attach()
    try:
        stats = train_steps(
            student,
            optimizer,
            itertools.islice(batches, config.steps),
            teacher=teacher,
            kd_alpha=1.0,
            kd_temperature=TEMPERATURE,
            lr_at=cosine_schedule(config.student_lr, 0, 1, config.steps),
            on_step=on_step,
            extra_loss=extra,
        )
    finally:
        if student_bns is not None:
            student_bns.detach()
    student.eval()
    return {"loss": stats["loss"], "label_agreement": stats["accuracy"]}
