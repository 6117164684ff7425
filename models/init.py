"""How every model family initialises the weights that are not binary latent weights."""

from __future__ import annotations

from torch import nn

from .layers import BinaryConv2d

__all__ = ["init_weights"]


def init_weights(model: nn.Module) -> None:
    """He-normal (fan out) real-valued convs, batch norm at identity; latent weights untouched.

    Binary layers keep their own initialisation of the latent weights; an AW-convolution
    without quantizers is the float conv it extends and is initialised as one.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and (not isinstance(m, BinaryConv2d) or _float_aw(m)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _float_aw(module: nn.Module) -> bool:
    from .attention import AWConv2d  # attention imports the layers; import it when called

    return (
        isinstance(module, AWConv2d)
        and module.input_quantizer is None
        and module.kernel_quantizer is None
    )
