"""Fake-quantised int8 / int4 layers and the ``quantized`` wrapper model.

Data-free compression turns a trained float network into a low-bit *student*: every plain
``nn.Conv2d`` / ``nn.Linear`` becomes a :class:`QuantConv2d` / :class:`QuantLinear` that keeps
its float ("latent") weight for training but computes with quantised values, so distillation
learns weights that survive rounding. The exporters write those layers as standard ONNX
``QuantizeLinear`` / ``DequantizeLinear`` around a float ``Conv`` / ``Gemm`` with int8 weight
initializers (:mod:`exporters.onnx_quantized`)::

    import models
    student = models.create("quantized", base=models.spec_of(teacher), weight_bits=4)
    student.load_state_dict(teacher.state_dict(), strict=False)  # only activation ranges missing

Two quantisers, chosen as inference engines expect them:

- weights: per output channel, symmetric (zero point 0), ``scale_c = max|w_c| / (2^(b-1) - 1)``
  and integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``: the scheme TensorRT and ONNX Runtime's
  int8 convolutions take (one scale per output channel folds into the int32 accumulator's
  rescale; a symmetric range needs no zero-point correction term). The scale is recomputed from
  the latent weight in every forward, so training moves it.
- activations (the layer's input): per tensor, asymmetric, integers in ``[0, 2^b - 1]`` with a
  zero point. Most inputs follow a ReLU and are never negative: a symmetric range would spend
  half its levels (one bit) on values that never occur. The range comes from the buffers
  ``activation_min`` / ``activation_max``, an exponential moving average of batch extremes in
  train mode (momentum 0.1; the first batch sets them), fixed in eval mode. The range always
  includes 0, so zero (ReLU outputs, zero padding) is represented exactly.

Gradients are straight-through (the identity) for values inside the representable range and
zero outside it (the clipped STE of Jacob et al. 2018, also PyTorch's ``FakeQuantize``); scales
and zero points get no gradient: they follow the weights and the data.

# References

- Jacob et al., *Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference*, CVPR 2018.
- Krishnamoorthi, *Quantizing deep convolutional networks for efficient inference: A
  whitepaper*, 2018 (per-channel symmetric weights, asymmetric activations).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import SpecError, UnknownModelError, build, canonical_spec, register_model

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "FakeQuantizedLayer",
    "activation_qparams",
    "fake_quantize",
    "quantize",
    "quantize_modules",
    "quantized",
    "weight_qparams",
]

MIN_BITS = 2
MAX_BITS = 8
MOMENTUM = 0.1
"""Weight of the newest batch in the moving average of the activation range."""


# --- the quantiser --------------------------------------------------------------------------


class _FakeQuantize(torch.autograd.Function):
    """Quantise-dequantise with a clipped straight-through gradient."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor | float,
        zero_point: torch.Tensor | float,
        qmin: int,
        qmax: int,
    ) -> torch.Tensor:
        q = quantize(x, scale, zero_point, qmin, qmax)
        low = (qmin - zero_point) * scale
        high = (qmax - zero_point) * scale
        ctx.save_for_backward((x >= low) & (x <= high))
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """The integers ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (as floats).

    ONNX ``QuantizeLinear``'s arithmetic: division by the scale, rounding half to even. The
    fake quantiser dequantises them; the exporter stores them.
    """
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``x`` rounded to the integer grid ``scale * (q - zero_point)``, ``q`` in [qmin, qmax].

    Forward: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, returns
    ``(q - zero_point) * scale``. ``torch.round`` rounds half to even and ``x`` is *divided* by
    the scale, exactly as ONNX ``QuantizeLinear`` does, so an exported graph gives the same
    values. Backward: the gradient passes unchanged where ``x`` lies in the representable range
    ``[(qmin - zero_point) * scale, (qmax - zero_point) * scale]`` and is zero outside it;
    ``scale`` and ``zero_point`` get none. Per-channel ``scale`` / ``zero_point`` are tensors
    the caller shapes to broadcast against ``x``.
    """
    out: torch.Tensor = _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)
    return out


def _check_bits(name: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Per-output-channel symmetric scales of ``weight`` (shape ``(Cout,)``) and ``qmax``.

    ``scale_c = max|w_c| / qmax`` with ``qmax = 2^(bits-1) - 1`` (-128 is left out so the range
    is symmetric, as TensorRT requires); an all-zero channel gets scale 1, any positive value
    represents its zeros exactly.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale, qmax


def activation_qparams(
    low: torch.Tensor, high: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-tensor asymmetric ``(scale, zero_point, qmax)`` for values in ``[low, high]``.

    The range is widened to include 0 and mapped onto ``[0, qmax]``, ``qmax = 2^bits - 1``;
    the zero point is the integer that 0.0 maps to, so zero is exact. An empty range (all
    zeros) gets scale 1.
    """
    qmax = 2**bits - 1
    low = torch.clamp(low.detach().float(), max=0.0)
    high = torch.clamp(high.detach().float(), min=0.0)
    span = high - low
    scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
    zero_point = torch.clamp(torch.round(-low / scale), 0, qmax)
    return scale, zero_point, qmax


# --- the layers -----------------------------------------------------------------------------


class FakeQuantizedLayer:
    """Mixin with the quantisation state shared by :class:`QuantConv2d` and :class:`QuantLinear`.

    Buffers (saved in checkpoints): ``activation_min``, ``activation_max`` (the input range)
    and ``activation_observed`` (1.0 once a train-mode batch has set the range, else 0.0).
    """

    weight: torch.Tensor
    weight_bits: int
    activation_bits: int
    activation_min: torch.Tensor
    activation_max: torch.Tensor
    activation_observed: torch.Tensor
    training: bool

    def _init_quantization(self, weight_bits: int, activation_bits: int) -> None:
        self.weight_bits = _check_bits("weight_bits", weight_bits)
        self.activation_bits = _check_bits("activation_bits", activation_bits)
        register = self.register_buffer  # type: ignore[attr-defined]
        register("activation_min", torch.zeros(()))
        register("activation_max", torch.zeros(()))
        register("activation_observed", torch.zeros(()))

    @property
    def observed(self) -> bool:
        """Whether the activation range has been set from data."""
        return bool(self.activation_observed.item())

    def weight_qparams(self) -> tuple[torch.Tensor, int]:
        """Per-output-channel scales of the current latent weight, and ``qmax``."""
        return weight_qparams(self.weight, self.weight_bits)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: the latent weight fake-quantised per channel."""
        scale, qmax = self.weight_qparams()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return fake_quantize(self.weight, scale.view(shape), 0.0, -qmax, qmax)

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as int8 integers and their per-channel scales (what an export stores)."""
        scale, qmax = self.weight_qparams()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        weight = self.weight.detach().float()
        return quantize(weight, scale.view(shape), 0.0, -qmax, qmax).to(torch.int8), scale

    def activation_qparams(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(scale, zero_point, qmax)`` of the input, from the recorded range."""
        return activation_qparams(self.activation_min, self.activation_max, self.activation_bits)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold a batch's extremes into the range: set on the first batch, then an EMA."""
        low, high = x.detach().min().float(), x.detach().max().float()
        if not self.observed:
            self.activation_min.copy_(low)
            self.activation_max.copy_(high)
            self.activation_observed.fill_(1.0)
        else:
            self.activation_min.lerp_(low, MOMENTUM)
            self.activation_max.lerp_(high, MOMENTUM)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input fake-quantised per tensor (train mode updates the range first).

        In eval mode the recorded range is used as it is. A layer that has never seen a
        train-mode batch (a freshly built student, or one evaluated before distillation) has no
        range yet; it then quantises each batch with that batch's own range and records
        nothing, so the student runs from the start while evaluation never changes it.
        Exporting such a layer is refused: it has no fixed range to write.
        """
        if self.training:
            self.observe(x)
        if self.observed:
            scale, zero_point, qmax = self.activation_qparams()
        else:
            scale, zero_point, qmax = activation_qparams(x.min(), x.max(), self.activation_bits)
        return fake_quantize(x, scale, zero_point, 0, qmax)

    def _adopt(self, layer: nn.Module) -> None:
        """Take over a float layer's parameters (shared, not copied) and its train/eval mode."""
        module: Any = self
        module.weight = layer.weight
        module.bias = layer.bias
        module.train(layer.training)

    def _quant_repr(self) -> str:
        return f", weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"


class QuantConv2d(FakeQuantizedLayer, nn.Conv2d):
    """2-D convolution on fake-quantised input and weights (see the module's doc).

    Arguments are those of :class:`torch.nn.Conv2d` plus keyword-only ``weight_bits`` and
    ``activation_bits`` (2..8). Parameter names are ``nn.Conv2d``'s, so a float layer's
    state dict loads into it.
    """

    def __init__(
        self,
        *args: Any,
        weight_bits: int = 8,
        activation_bits: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantization(weight_bits, activation_bits)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, weight_bits: int, activation_bits: int) -> QuantConv2d:
        """A quantised layer with ``layer``'s hyper-parameters, sharing its parameters."""
        quant = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
        )
        quant._adopt(layer)
        return quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QuantLinear(FakeQuantizedLayer, nn.Linear):
    """Fully connected layer on fake-quantised input and weights (see the module's doc).

    Arguments are those of :class:`torch.nn.Linear` plus keyword-only ``weight_bits`` and
    ``activation_bits`` (2..8).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        weight_bits: int = 8,
        activation_bits: int = 8,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantization(weight_bits, activation_bits)

    @classmethod
    def from_float(cls, layer: nn.Linear, weight_bits: int, activation_bits: int) -> QuantLinear:
        """A quantised layer with ``layer``'s hyper-parameters, sharing its parameters."""
        quant = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            layer.weight.device,
            layer.weight.dtype,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
        )
        quant._adopt(layer)
        return quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


def quantize_modules(model: nn.Module, weight_bits: int, activation_bits: int) -> nn.Module:
    """Replace every plain ``nn.Conv2d`` / ``nn.Linear`` of ``model`` in place; return it.

    Only layers whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` are replaced: binary
    layers (:class:`models.layers.BinaryConv2d`, ``BinaryLinear``, ``AWConv2d``) and any other
    subclass keep their own quantisation, and the layers inside them (AW attention's small
    dense layers) are left alone too, since their owner's exporter reads them as float. The
    new layers share the old ones' parameters under the same names, so
    ``model.load_state_dict(float_state, strict=False)`` loads a float network's weights
    (missing keys: only the activation-range buffers).
    """
    _check_bits("weight_bits", weight_bits)
    _check_bits("activation_bits", activation_bits)

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if type(child) is nn.Conv2d:
                quant: nn.Module = QuantConv2d.from_float(child, weight_bits, activation_bits)
                setattr(module, name, quant)
            elif type(child) is nn.Linear:
                quant = QuantLinear.from_float(child, weight_bits, activation_bits)
                setattr(module, name, quant)
            elif not isinstance(child, nn.Conv2d | nn.Linear):
                replace(child)

    replace(model)
    return model


# --- the registered wrapper -----------------------------------------------------------------

DEFAULT_BASE = "resnet18"


def _canonical(args: dict[str, Any]) -> dict[str, Any]:
    """Check the bits and complete ``base`` into a full spec (every default filled in)."""
    for key in ("weight_bits", "activation_bits"):
        try:
            _check_bits(key, args[key])
        except ValueError as err:
            raise SpecError(f"model 'quantized': {err}") from None
    base = args["base"]
    if base is None:
        base = {"name": DEFAULT_BASE, "args": {}}
    if (
        not isinstance(base, dict)
        or not isinstance(base.get("name"), str)
        or not isinstance(base.get("args", {}), dict)
    ):
        raise SpecError(
            "model 'quantized': base must be a model spec, a mapping with a string 'name' and "
            f"a dict 'args' (e.g. models.spec_of(teacher)), not {base!r}"
        )
    if base.get("name") == "quantized":
        raise SpecError(
            "model 'quantized': base is already a quantized model; give the float network's "
            "spec (its 'base')"
        )
    try:
        full = canonical_spec(base)
    except (SpecError, UnknownModelError) as err:
        raise SpecError(f"model 'quantized': base: {err}") from None
    return {**args, "base": full}


@register_model(family="quantized", canonical=_canonical)
def quantized(
    base: dict[str, Any] | None = None, weight_bits: int = 8, activation_bits: int = 8
) -> nn.Module:
    """A registered network with its float convs and dense layers fake-quantised (int8/int4).

    ``base`` is the float network's spec (``models.spec_of(teacher)``; ``None``: a float
    ResNet-18); the spec recorded for this model holds it in full. Only plain ``nn.Conv2d`` /
    ``nn.Linear`` layers are quantised, so a base with binary layers is fine: its binary layers
    stay binary and its float ones (stem, shortcuts, classifier) become low-bit. A base
    without a single float layer is refused, as there would be nothing to quantise.
    """
    model = build(base or {"name": DEFAULT_BASE, "args": {}})
    quantize_modules(model, weight_bits, activation_bits)
    if not any(isinstance(m, FakeQuantizedLayer) for m in model.modules()):
        raise SpecError(
            f"model 'quantized': base '{(base or {}).get('name', DEFAULT_BASE)}' has no float "
            "nn.Conv2d / nn.Linear layer to quantise"
        )
    return model
