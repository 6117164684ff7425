"""bitfleet's network definitions: binary layers, quantizers, model families and a registry.

The one door is :func:`create`::

    import models
    net = models.create("bireal18", stem="imagenet", num_classes=1000)
    spec = models.spec_of(net)            # JSON-able; models.build(spec) rebuilds it
    models.list_models("bireal*")         # ['bireal18', 'bireal34']

Importing this package registers every family. Of bitfleet's own code it imports only the shared,
torch-free :mod:`bitfleet` package (errors, checkpoint files).
"""

from . import (  # noqa: F401  (importing a family registers its models)
    densenet,
    fractal,
    lenet,
    nasb,
    quantized,
    resnet,
)
from .constraints import clip_latent_weights
from .layers import BinaryConv2d, BinaryLinear
from .ops import OpCount, count_ops
from .quantized import FakeQuantizedLayer, QuantConv2d, QuantLinear, fake_quantize, quantize_modules
from .registry import (
    SpecError,
    UnknownModelError,
    build,
    create,
    dump_spec,
    is_model,
    list_models,
    load_spec,
    model_entry,
    register_model,
    spec_of,
)

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "FakeQuantizedLayer",
    "OpCount",
    "QuantConv2d",
    "QuantLinear",
    "SpecError",
    "UnknownModelError",
    "build",
    "clip_latent_weights",
    "count_ops",
    "create",
    "dump_spec",
    "fake_quantize",
    "is_model",
    "list_models",
    "load_spec",
    "model_entry",
    "quantize_modules",
    "register_model",
    "spec_of",
]
