"""Count a model's cost the way the binary-network papers do.

- ``params``: every parameter element (latent float weights of binary layers included);
- ``flops``: real-valued multiply-accumulates of convolutions and dense layers;
- ``bops``: binary multiply-accumulates (layers whose inputs *and* weights are binarized, which
  become XNOR + popcount);
- ``ops = flops + bops / 64``: Bi-Real Net's measure (a 64-bit CPU does 64 binary MACs in the
  time of one float MAC).

As in Bi-Real and its successors, batch norm, pooling, additions and activations are not
counted: their cost is small next to the convolutions and they are the same in every method
being compared. The count runs one forward pass on a zero input with hooks on the layers, so
any architecture built from ``nn.Conv2d`` / ``nn.Linear`` (and their binary subclasses) is
counted without per-family code.

Two declarations let a layer that does more than a convolution say so (AW-convolution,
:class:`models.attention.AWConv2d`, uses both):

- ``binary_macs = False``: its quantizers are binary but its MACs are not XNOR-popcounts
  (per-sample real weights), so they count as FLOPs;
- ``extra_macs() -> int``: real-valued MACs per image that its forward does outside its child
  layers (AW's per-sample weight generation); they count as FLOPs, in a row of their own named
  ``<layer>.extra`` of kind ``"extra"``. Child layers (``nn.Linear`` etc.) are hooked as usual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerCost", "OpCount", "count_ops"]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one convolution or dense layer."""

    name: str
    kind: str  # "conv", "linear" or "extra" (a layer's own work besides its children)
    binary: bool
    macs: int
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class OpCount:
    """A model's totals, plus the per-layer breakdown."""

    params: int
    flops: int
    bops: int
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def ops(self) -> float:
        """Bi-Real's OPs: FLOPs + BOPs / 64."""
        return self.flops + self.bops / 64

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params": self.params,
            "flops": self.flops,
            "bops": self.bops,
            "ops": self.ops,
        }
        if per_layer:
            out["layers"] = [asdict(layer) for layer in self.layers]
        return out


def _is_binary(module: nn.Module) -> bool:
    declared = getattr(module, "binary_macs", None)
    if declared is not None:
        return bool(declared and getattr(module, "is_binary", False))
    return bool(getattr(module, "is_binary", False))


def count_ops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> OpCount:
    """Count params, FLOPs and BOPs of ``model`` for one input of ``input_shape`` (batch 1).

    The leading batch dimension is divided out, so counts are per image.
    """
    batch = input_shape[0]
    layers: list[LayerCost] = []
    handles = []

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # registered on convolutions and dense layers only (below)
        assert isinstance(module, nn.Conv2d | nn.Linear)
        weight = module.weight
        if isinstance(module, nn.Conv2d):
            # each output element needs (Cin/groups) * kh * kw MACs
            per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]
            kind = "conv"
        else:
            per_output = weight.shape[1]
            kind = "linear"
        macs = output.numel() // batch * per_output
        params = sum(p.numel() for p in module.parameters(recurse=False))
        layers.append(
            LayerCost(
                names[module], kind, _is_binary(module), macs, params, tuple(output.shape[1:])
            )
        )
        extra = getattr(module, "extra_macs", None)
        if extra is not None:
            layers.append(LayerCost(f"{names[module]}.extra", "extra", False, int(extra()), 0, ()))

    names = {module: name for name, module in model.named_modules()}
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    return OpCount(
        params=sum(p.numel() for p in model.parameters()),
        flops=sum(layer.macs for layer in layers if not layer.binary),
        bops=sum(layer.macs for layer in layers if layer.binary),
        layers=layers,
    )
