"""Checkpoints: ``save(model, dir, **meta)`` and ``load(dir)``; see :mod:`exporters.checkpoints`.

The implementation sits in ``exporters`` so the ONNX writer can read checkpoints without
importing the toolkit (DESIGN.md section 1); this module is the toolkit's name for it.
"""

from exporters.checkpoints import (
    CHECKPOINT_FORMAT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SPEC_FILE,
    Checkpoint,
    CheckpointError,
    is_checkpoint,
    load,
    read_spec_file,
    save,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "SPEC_FILE",
    "Checkpoint",
    "CheckpointError",
    "is_checkpoint",
    "load",
    "read_spec_file",
    "save",
]
