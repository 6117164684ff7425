"""Attention for binary and float CNNs: AW-convolution (on the weights) and squeeze-excitation.

Activation attention such as squeeze-excitation (SE, Hu et al. 2018) rescales a layer's
*output* channels by a per-sample gate computed from the globally pooled input. AW-convolution
(Zhu, Hofstee, Lee, Al-Ars, ICANN 2021) attends to the *weights* instead: a per-sample tensor
``A(x)`` shaped like the kernel multiplies it before the convolution::

    y = conv(x, A(x) * W + W)

so every output channel sees its own reweighting of every input channel and tap, which neither
a channel gate nor a spatial map can express. The paper gives the recipe (global average
pooling, two small learned layers with a ReLU between, a residual on the weight) but not the
exact generator; ours is a low-rank product, full in the weight's shape (see
:class:`AWConv2d`). docs/models.md records the choice and its cost.

A ResNet takes ``attention="none" | "se" | "aw" | "se+aw"`` (:data:`ATTENTIONS`);
:func:`parse_attention` turns that name into the two switches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BinaryConv2d, _PadArg, _PaddingMode
from .quantizers import QuantizerLike

__all__ = ["ATTENTIONS", "AWConv2d", "SqueezeExcitation", "parse_attention"]

ATTENTIONS = ("none", "se", "aw", "se+aw")
"""The attention a ResNet-family builder accepts."""


def parse_attention(attention: str) -> tuple[bool, bool]:
    """``(use_se, use_aw)`` for an attention name; ValueError naming the valid ones."""
    if attention not in ATTENTIONS:
        raise ValueError(
            f"unknown attention {attention!r}; use one of {', '.join(repr(a) for a in ATTENTIONS)}"
        )
    return "se" in attention, "aw" in attention


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(W2 relu(W1 avgpool(x)))``, one gate per channel.

    The baseline AW-convolution is compared with (Hu et al., CVPR 2018). ``hidden`` is
    ``max(min_hidden, channels // reduction)``. The two layers are 1x1 convolutions on the
    pooled 1x1 map (as timm's ``SEModule``), so the op counter and the ONNX writer treat them as
    the ordinary float layers they are.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or min_hidden < 1:
            raise ValueError("channels, reduction and min_hidden must be >= 1")
        hidden = max(min_hidden, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class AWConv2d(BinaryConv2d):
    """AW-convolution: ``conv(x, A(x) * W + W)`` with a per-sample, weight-shaped attention A.

    Float when both quantizers are ``None``; binary otherwise, like :class:`BinaryConv2d` (same
    arguments and defaults): the input goes through ``input_quantizer`` (and is padded with +1),
    ``W`` is the latent weight through ``kernel_quantizer``, and the attention stays
    real-valued. The per-sample weights ``(1 + A) * W`` are therefore real, so a binary AW layer
    is *not* an XNOR-popcount layer: the op counter counts its MACs as FLOPs
    (``binary_macs = False``) and the exporters run it as a float convolution. Its latent weight
    is still a binary layer's (clipped, sent by gossip as signs).

    Generator (per sample)::

        p = mean over H, W of x                       (Cin,)
        h = relu(squeeze(p))                          (r,)    r = hidden
        U = tanh(rows(h)).view(Cout, k)               (Cout, k)
        V = tanh(cols(h)).view(k, Cin * kh * kw) / k  (k, Cin*kh*kw)
        A = (U @ V).view(Cout, Cin, kh, kw)           |A| <= 1

    The two tanh and the ``1 / k`` bound every entry of ``A`` by 1, so ``(1 + A) * W`` rescales
    each weight by a factor in [0, 2] and never flips its sign. Unbounded factors let ``A``
    grow with the input's mean: on digits-hard a ResNet-18 reached ``|A| = 224`` within its
    first epoch and stayed at chance on one seed of three.

    ``A`` has rank ``k`` (``rank``, default 2) as a Cout x (Cin*kh*kw) matrix, but it is not a
    product of a channel map and a spatial map: every (input channel, tap) column is its own
    combination of the ``k`` row factors. ``rows`` starts at zero, so ``A = 0`` and the layer
    starts as the plain convolution; ``cols`` keeps its random start, so the first gradient
    reaches ``rows`` (with both at zero no gradient would ever leave zero).

    Cost per image, beyond the plain convolution (whose MACs the batched grouped convolution
    keeps): ``Cin*r + r*Cout*k + r*k*Cin*kh*kw`` for the three small layers (counted by the op
    counter's dense-layer hooks), plus ``(k + 1) * Cout*Cin*kh*kw`` for ``U @ V`` and the
    modulation (:meth:`extra_macs`). Against the convolution's ``Cout*Cin*kh*kw * Ho*Wo`` that is
    about ``(k + 1) / (Ho*Wo)``: 4.7% on an 8x8 map with ``k = 2``.

    Two exact ways to run a batch, chosen per call by the output map's size:

    - **grouped** (output maps of more than :attr:`factored_below` pixels): all samples as one
      grouped convolution, ``x`` as ``1 x (B*Cin) x H x W``, the per-sample weights as
      ``(B*Cout) x Cin x kh x kw``, ``groups = B``;
    - **factored** (small maps): ``A * W`` is never built. With ``A = U V``,
      ``conv(x, A*W + W) = W x + sum_r U_r * (W (V_r * x))`` on the unfolded input (``x`` as
      columns ``Cin*kh*kw x Ho*Wo``), so the ``rank + 1`` products with the *shared* ``W`` run
      as one matrix multiply over the batch. The grouped convolution materialises
      ``B x Cout x Cin*kh*kw`` weights and runs ``B`` tiny convolutions, which on a CPU costs
      100-300x the plain convolution on 2x2 and 1x1 maps (the last stages of a 32x32 network);
      the factored form costs about ``rank + 1`` plain products there.
    """

    factored_below = 32
    """Output maps with fewer pixels than this run the factored form (see above)."""

    binary_macs = False
    """Per-sample real weights: the op counter counts this layer's MACs as FLOPs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: _PadArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        input_quantizer: QuantizerLike = None,
        kernel_quantizer: QuantizerLike = None,
        latent_clip: float | None = 1.0,
        rank: int = 2,
        hidden: int | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(f"AWConv2d takes groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(
                f"AWConv2d pads with zeros (float) or +1 (binary input), not {padding_mode!r}"
            )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            latent_clip=latent_clip,
        )
        hidden = max(4, in_channels // 16) if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        kh, kw = self.kernel_size
        self.rank = rank
        self.squeeze = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.rows = nn.Linear(hidden, out_channels * rank, device=device, dtype=dtype)
        self.cols = nn.Linear(hidden, rank * in_channels * kh * kw, device=device, dtype=dtype)
        nn.init.zeros_(self.rows.weight)
        nn.init.zeros_(self.rows.bias)

    @property
    def taps(self) -> int:
        """Columns of the weight as a matrix: ``Cin * kh * kw``."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's factors for a batch: ``U`` (B, Cout, k) and ``V`` (B, k, Cin*kh*kw)."""
        h = self.relu(self.squeeze(x.mean(dim=(2, 3))))
        u = torch.tanh(self.rows(h)).view(-1, self.out_channels, self.rank)
        v = torch.tanh(self.cols(h)).view(-1, self.rank, self.taps) / self.rank
        return u, v

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``A(x)``: (B, Cout, Cin, kh, kw), real-valued."""
        u, v = self.factors(x)
        return torch.bmm(u, v).view(-1, *self.weight.shape)

    def sample_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``A(x) * W + W``: (B, Cout, Cin, kh, kw), W quantized."""
        u, v = self.factors(x)
        weight = self.quantized_weight().reshape(1, self.out_channels, self.taps)
        # W + A * W in one pass over the (B, Cout, Cin*kh*kw) tensor
        return torch.addcmul(weight, torch.bmm(u, v), weight).view(-1, *self.weight.shape)

    def extra_macs(self) -> int:
        """MACs per image outside the child layers: ``U @ V`` and the modulation ``A*W + W``."""
        return (self.rank + 1) * self.out_channels * self.taps

    def _padded_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the kernel slides over: quantized, padded (+1 when binary, else 0)."""
        pad_value = 0.0
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
            pad_value = 1.0
        if any(self.one_padding):
            x = F.pad(x, self.one_padding, value=pad_value)
        return x

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` of the padded input's ``(H, W)``."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        return (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self._padded_input(x)
        ho, wo = self._output_size(padded.shape[2], padded.shape[3])
        if ho * wo < self.factored_below:
            out = self.forward_factored(x, padded)
        else:
            out = self.forward_grouped(x, padded)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def forward_factored(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """``conv(x, A*W + W)`` without bias as ``W x + sum_r U_r (W (V_r x))``, unfolded."""
        batch = x.shape[0]
        u, v = self.factors(x)
        weight = self.quantized_weight().reshape(self.out_channels, self.taps)
        ho, wo = self._output_size(padded.shape[2], padded.shape[3])
        # (B, Ho*Wo, Cin*kh*kw): each output pixel's receptive field as one row
        cols = F.unfold(padded, self.kernel_size, dilation=self.dilation, stride=self.stride)
        cols = cols.transpose(1, 2)
        stacked = torch.cat([cols.unsqueeze(1), v.unsqueeze(2) * cols.unsqueeze(1)], dim=1)
        products = (stacked.reshape(-1, self.taps) @ weight.t()).view(
            batch, self.rank + 1, ho * wo, self.out_channels
        )
        modulated = (u.transpose(1, 2).unsqueeze(2) * products[:, 1:]).sum(dim=1)
        out = (products[:, 0] + modulated).transpose(1, 2)
        return out.reshape(batch, self.out_channels, ho, wo)

    def forward_grouped(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """``conv(x, A*W + W)`` without bias as one grouped convolution over the batch."""
        batch = x.shape[0]
        weights = self.sample_weights(x)
        x = padded
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, x.shape[2], x.shape[3]),
            weights.reshape(batch * self.out_channels, self.in_channels, *self.kernel_size),
            None,
            self.stride,
            0,
            self.dilation,
            batch,
        )
        return out.view(batch, self.out_channels, out.shape[2], out.shape[3])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, hidden={self.squeeze.out_features}"
