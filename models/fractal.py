"""SoFAr (Zhu, Hofstee, Lee, Al-Ars, 2020): fractal binary nets with shortcuts, RF and DRF.

FractalNet (Larsson et al., ICLR 2017) expands a block recursively::

    f_1(z)     = conv(z)
    f_{C+1}(z) = join(f_C(f_C(z)), conv(z))        join = element-wise mean

so a block of C columns holds 2^C - 1 convs and its longest path is 2^(C-1) convs deep. As in
FractalNet's figure and code, joins that meet are one join: ``join(join(a, b), c)`` is the mean
of ``a, b, c``, so the last join of a C-column block averages C inputs, one per column (column
1 is the single conv, column j the chain of 2^(j-1) convs), and every column weighs the same.

Drop-path (FractalNet's regulariser, training only; off in eval and hence in export):

- *local*: at every join, each input is dropped with probability ``drop_path``, keeping at least
  one (one chosen at random when all would go); the join averages what is left;
- *global*: with probability ``global_drop`` a mini-batch trains one column only, the same
  column in every block of the network (FractalNet alternates the two 50/50 with p = 0.15).

Both are off by default (``drop_path=0.0, global_drop=0.0``): what SoFAr trains with is not in
the material available here, and without them every weight gets a gradient on every step.
Pass ``drop_path=0.15, global_drop=0.5`` for FractalNet's setting.

SoFAr puts binary convs in the fractal and adds the shortcuts binary nets need:

- ``sofar_rf`` (residual fractal, on Bi-Real ResNet): every conv of the fractal is a Bi-Real
  unit, ``BN(BinaryConv3x3(sign(x))) + shortcut(x)``, a real-valued shortcut around each single
  binary conv. A stage of Bi-Real-18 (four units) becomes ``ceil(4 / 2^(C-1))`` fractal blocks;
  the first conv of every column of a stage's first block downsamples (stride 2, Bi-Real's
  avg-pool + 1x1 shortcut). ``columns=1`` is Bi-Real-18 itself.
- ``sofar_drf`` (dense fractal, on BinaryDenseNet-28): the convs are BinaryDenseNet's
  ``BN -> BinaryConv3x3`` and the fractal's shortcuts are concatenations. A block adds
  ``G = growth * 2^(C-1)`` channels: its input is concatenated with the mean of its columns'
  new features. Column j chains 2^(j-1) dense layers of ``G / 2^(j-1)`` channels each, every
  one reading the block input concatenated with what its column made before it (the deep half
  of ``f_{C+1}`` is ``f_C`` on the input, then ``f_C`` on input + those features), so every
  column makes exactly G channels and they can be averaged. A stage of BinaryDenseNet-28's
  ``n`` dense layers becomes ``ceil(n / 2^(C-1))`` blocks, so the longest path and the channel
  growth per stage stay close to BinaryDenseNet-28's. ``columns=1`` is BinaryDenseNet-28.

Our reading of the paper's names (not verified against its full text): ``RF-c4d8 ResNet37(41)``
is a residual fractal of c = 4 columns whose longest column is d = 8 = 2^(4-1) convs deep, on a
ResNet of 37 layers (four stages of one c4 block: 32 binary convs, plus the stem, the three 1x1
downsampling convs and the classifier: exactly what ``sofar_rf`` builds), with base width 41
(Bi-Real-18 has 64). ``DRF-c2d2 DenseNet51(53)`` is a dense fractal of 2 columns, longest column
2, with growth 53. The base width or growth is what makes the OPs equal to the baseline's;
:func:`width_for_ops` finds it for bitfleet's networks, whose layouts need not be the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .attention import AWConv2d, SqueezeExcitation, parse_attention
from .densenet import (
    BDN28_LAYERS,
    BDN28_REDUCTION,
    LATENT_CLIP,
    BinaryDenseConv,
    BinaryDenseNet,
)
from .init import init_weights
from .ops import count_ops
from .quantizers import QuantizerLike
from .registry import create, register_model
from .resnet import BiRealUnit, ResNet

__all__ = [
    "Fractal",
    "DenseFractal",
    "FractalResNet",
    "FractalDenseNet",
    "draw_column",
    "width_for_ops",
]

Spec = tuple[int, ...]
"""The arguments of a fractal's outermost convs: ``(in, out, stride)`` or ``(in, growth)``."""

Keep = tuple[bool, ...]
"""Which columns a join keeps, column 1 (the single conv) first."""


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


class Fractal(nn.Module):
    """FractalNet's block ``f_C`` over any conv unit, with one C-input join and drop-path.

    Args:
        columns: C >= 1.
        spec: the arguments of the block's outermost convs (what ``unit`` takes).
        unit: builds one conv from a spec.
        split: the specs of the two halves of the deep column, ``f_C(f_C(z))``, from the
            block's spec (the second half may take other inputs, e.g. stride 1).
        dense: chain by concatenation (dense fractal): the second half reads
            ``concat(z, first(z))`` and the deep column's output is ``concat(first(z),
            second(...))``; otherwise the second half reads ``first(z)`` and its output is the
            column's.
        drop_path: probability of dropping each join input in training (local drop-path).
    """

    def __init__(
        self,
        columns: int,
        spec: Spec,
        unit: Callable[[Spec], nn.Module],
        split: Callable[[Spec], tuple[Spec, Spec]],
        *,
        dense: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if columns < 1:
            raise ValueError(f"a fractal needs at least one column, got columns={columns}")
        _check_rate("drop_path", drop_path)
        self.columns = columns
        self.dense = dense
        self.drop_path = drop_path
        self.shallow = unit(spec)
        if columns > 1:
            first, second = split(spec)
            options: dict[str, Any] = {"dense": dense, "drop_path": drop_path}
            self.first = Fractal(columns - 1, first, unit, split, **options)
            self.second = Fractal(columns - 1, second, unit, split, **options)

    def sample_keep(self) -> Keep:
        """A local drop-path draw: each column kept with 1 - p, at least one kept."""
        drop = torch.rand(self.columns) < self.drop_path
        if bool(drop.all()):
            drop[int(torch.randint(self.columns, ()))] = False
        return tuple(not d for d in drop.tolist())

    def branches(self, x: Tensor, keep: Keep, forced: bool = False) -> list[Tensor]:
        """The inputs of this block's last join, one per kept column (column 1 first).

        ``forced``: ``keep`` is a global drop-path choice that the inner blocks follow too;
        otherwise inner joins draw their own local drop-path.
        """
        outs = [self.shallow(x)] if keep[0] else []
        deep = keep[1:]
        if self.columns > 1 and any(deep):
            y = self.first(x, deep if forced else None)
            z = torch.cat([x, y], 1) if self.dense else y
            inner = self.second.branches(z, deep, forced)
            outs += [torch.cat([y, b], 1) for b in inner] if self.dense else inner
        return outs

    def forward(self, x: Tensor, keep: Keep | None = None) -> Tensor:
        """Join of the columns: all in eval, a local drop-path draw in training.

        ``keep`` (one flag per column) overrides the draw here and in every inner join: the
        network passes a global drop-path choice this way.
        """
        forced = keep is not None
        if keep is None:
            if self.training and self.drop_path > 0:
                keep = self.sample_keep()
            else:
                keep = (True,) * self.columns
        if len(keep) != self.columns or not any(keep):
            raise ValueError(f"keep needs {self.columns} flags, at least one True; got {keep}")
        outs = self.branches(x, keep, forced)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total if len(outs) == 1 else total / len(outs)


def draw_column(columns: int, global_drop: float, training: bool) -> Keep | None:
    """A global drop-path draw for one mini-batch: one column's flags, or None (no global).

    With probability ``global_drop`` (in training only), one column chosen uniformly.
    """
    if not training or global_drop <= 0 or float(torch.rand(())) >= global_drop:
        return None
    chosen = int(torch.randint(columns, ()))
    return tuple(i == chosen for i in range(columns))


# --- RF: residual fractal on Bi-Real ResNet --------------------------------------------------


def _residual_split(spec: Spec) -> tuple[Spec, Spec]:
    cin, cout, stride = spec
    return (cin, cout, stride), (cout, cout, 1)


class FractalResNet(ResNet):
    """Bi-Real ResNet-18 with each stage's units replaced by residual fractal blocks.

    The stem, downsampling, pooling and classifier are Bi-Real-18's (the :class:`ResNet` this
    extends); only ``stages`` differ. See the module doc for the layout.
    """

    def __init__(
        self,
        columns: int,
        *,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        in_channels: int = 3,
        input_quantizer: QuantizerLike = "approx_sign",
        kernel_quantizer: QuantizerLike = "magnitude_aware_sign",
        drop_path: float = 0.0,
        global_drop: float = 0.0,
        attention: str = "none",
    ) -> None:
        if columns < 1:
            raise ValueError(f"a fractal needs at least one column, got columns={columns}")
        _check_rate("global_drop", global_drop)
        parse_attention(attention)
        super().__init__(
            "bireal",
            (1, 1, 1, 1),
            num_classes=num_classes,
            stem=stem,
            width=width,
            in_channels=in_channels,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
        )
        self.columns = columns
        self.global_drop = global_drop

        def unit(spec: Spec) -> nn.Module:
            cin, cout, stride = spec
            return BiRealUnit(
                cin, cout, stride, input_quantizer, kernel_quantizer, attention=attention
            )

        # Bi-Real-18 has 4 binary convs per stage; keep the longest path at least that deep
        per_stage = math.ceil(4 / 2 ** (columns - 1))
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]  # as ResNet's
        channels = widths[0]
        stages = []
        for index, out in enumerate(widths):
            blocks = []
            for b in range(per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                spec = (channels, out, stride)
                blocks.append(Fractal(columns, spec, unit, _residual_split, drop_path=drop_path))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        keep = draw_column(self.columns, self.global_drop, self.training)
        x = self.stem(x.contiguous(memory_format=torch.channels_last)).contiguous()
        for stage in self.stages:
            for block in stage.children():
                x = block(x, keep)
        return self.classifier(self.pool(x).flatten(1))


# --- DRF: dense fractal on BinaryDenseNet ----------------------------------------------------


def _dense_conv(
    in_channels: int,
    new: int,
    input_quantizer: QuantizerLike,
    kernel_quantizer: QuantizerLike,
    attention: str,
) -> nn.Module:
    """BinaryDenseNet's ``BN -> binary 3x3 conv``, with attention as ``attention`` says.

    "aw" makes the conv an AW-convolution, "se" gates the new features with squeeze-excitation.
    """
    use_se, use_aw = parse_attention(attention)
    layer = BinaryDenseConv(in_channels, new, input_quantizer, kernel_quantizer)
    if use_aw:
        layer.conv = AWConv2d(
            in_channels,
            new,
            3,
            padding=1,
            bias=False,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            latent_clip=LATENT_CLIP,
        )
    return nn.Sequential(layer, SqueezeExcitation(new)) if use_se else layer


def _dense_split(spec: Spec) -> tuple[Spec, Spec]:
    cin, growth = spec
    half = growth // 2
    return (cin, half), (cin + half, half)


class DenseFractal(nn.Module):
    """``concat(x, join of the columns' new features)``: one DRF block, ``growth`` channels more.

    ``growth`` must be divisible by ``2^(columns-1)`` (the longest column's convs each make
    ``growth / 2^(columns-1)`` channels).
    """

    def __init__(
        self,
        columns: int,
        in_channels: int,
        growth: int,
        input_quantizer: QuantizerLike,
        kernel_quantizer: QuantizerLike,
        drop_path: float = 0.0,
        attention: str = "none",
    ) -> None:
        super().__init__()
        if growth % 2 ** (columns - 1):
            raise ValueError(f"growth {growth} is not divisible by 2^(columns-1)")

        def unit(spec: Spec) -> nn.Module:
            cin, new = spec
            return _dense_conv(cin, new, input_quantizer, kernel_quantizer, attention)

        self.fractal = Fractal(
            columns, (in_channels, growth), unit, _dense_split, dense=True, drop_path=drop_path
        )

    def forward(self, x: Tensor, keep: Keep | None = None) -> Tensor:
        return torch.cat([x, self.fractal(x, keep)], 1)


class FractalDenseNet(BinaryDenseNet):
    """BinaryDenseNet-28 whose dense layers are grouped into dense fractal blocks.

    ``growth`` is what each conv of the longest column adds; a block adds ``growth *
    2^(columns-1)``. See the module doc for the layout.
    """

    def __init__(
        self,
        columns: int,
        *,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        growth: int = 64,
        in_channels: int = 3,
        input_quantizer: QuantizerLike = "ste_sign",
        kernel_quantizer: QuantizerLike = "ste_sign",
        drop_path: float = 0.0,
        global_drop: float = 0.0,
        layers: Sequence[int] = BDN28_LAYERS,
        reduction: Sequence[float] = BDN28_REDUCTION,
        attention: str = "none",
    ) -> None:
        if columns < 1:
            raise ValueError(f"a fractal needs at least one column, got columns={columns}")
        _check_rate("drop_path", drop_path)
        _check_rate("global_drop", global_drop)
        parse_attention(attention)
        longest = 2 ** (columns - 1)

        def block(cin: int, rate: int) -> tuple[nn.Module, int]:
            new = rate * longest
            fractal = DenseFractal(
                columns,
                cin,
                new,
                input_quantizer,
                kernel_quantizer,
                drop_path=drop_path,
                attention=attention,
            )
            return fractal, cin + new

        super().__init__(
            [math.ceil(n / longest) for n in layers],
            reduction,
            num_classes=num_classes,
            stem=stem,
            width=width,
            growth=growth,
            in_channels=in_channels,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            block=block,
        )
        self.columns = columns
        self.global_drop = global_drop

    def forward(self, x: Tensor) -> Tensor:
        keep = draw_column(self.columns, self.global_drop, self.training)
        x = self.stem_forward(x)
        for module in self.features:
            x = module(x, keep) if isinstance(module, DenseFractal) else module(x)
        return self.head_forward(x)


# --- matching OPs ----------------------------------------------------------------------------


def _default_values(param: str) -> list[float]:
    if param == "width":  # base widths 1..512 channels (64 at width 1)
        return [n / 64 for n in range(1, 513)]
    if param == "growth":
        return [float(n) for n in range(1, 257)]
    raise ValueError(f"no default candidate values for {param!r}; pass values=[...]")


def width_for_ops(
    builder: str | Callable[..., nn.Module],
    target_ops: float,
    *,
    param: str = "width",
    values: Sequence[float] | None = None,
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    tolerance: float = 0.05,
    **kwargs: Any,
) -> float:
    """The value of ``param`` (width, growth, ...) whose model's OPs come closest to a target.

    ``builder`` is a registered model name or a factory; ``kwargs`` are its other arguments.
    OPs (:func:`models.count_ops` at ``input_shape``) grow with the width, so the candidate
    ``values`` (default: base widths 1..512 channels, or growth 1..256) are searched by
    doubling steps from the smallest, then bisection: about 2 log2(n) counts, none of a model
    much above the target. Raises ValueError when the closest is further than ``tolerance``
    (relative) from the target, naming the reachable range. An integer parameter comes back as
    an int.

    >>> width_for_ops("sofar_rf", count_ops(create("bireal18", stem="imagenet")).ops,
    ...               stem="imagenet")  # doctest: +SKIP
    """
    if target_ops <= 0:
        raise ValueError(f"target_ops must be > 0, got {target_ops}")
    candidates = sorted(set(values if values is not None else _default_values(param)))
    if not candidates:
        raise ValueError("values is empty")
    integer = param != "width" and all(float(v).is_integer() for v in candidates)
    seen: dict[float, float] = {}

    def ops(value: float) -> float:
        if value not in seen:
            arg = int(value) if integer else value
            kw = {**kwargs, param: arg}
            model = create(builder, **kw) if isinstance(builder, str) else builder(**kw)
            seen[value] = count_ops(model, input_shape).ops
        return seen[value]

    # gallop up from the smallest candidate (cheap models first), then bisect the last step:
    # the first candidate whose OPs reach the target, never counting one far above it
    lo, hi = 0, 0
    while hi < len(candidates) - 1 and ops(candidates[hi]) < target_ops:
        lo, hi = hi + 1, min(2 * hi + 1, len(candidates) - 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if ops(candidates[mid]) < target_ops:
            lo = mid + 1
        else:
            hi = mid
    near = [candidates[i] for i in (lo - 1, lo, lo + 1) if 0 <= i < len(candidates)]
    best = min(near, key=lambda v: abs(ops(v) - target_ops))
    error = abs(ops(best) - target_ops) / target_ops
    if error > tolerance:
        low, high = ops(candidates[0]), ops(candidates[-1])
        raise ValueError(
            f"no {param} in [{candidates[0]:g}, {candidates[-1]:g}] gives {target_ops:.4g} OPs "
            f"within {tolerance:.0%} (closest: {param}={best:g} at {ops(best):.4g}; the "
            f"candidates span {low:.4g}..{high:.4g} OPs)"
        )
    return int(best) if integer else best


# --- registered models -----------------------------------------------------------------------

RF_WIDTH = 44 / 64
"""Default ``sofar_rf`` width: OPs within 5% of ``bireal18`` at 224x224 (tests check it)."""

DRF_GROWTH = 54
"""Default ``sofar_drf`` growth: OPs within 5% of ``binarydensenet28`` at 224x224."""


@register_model(family="sofar")
def sofar_rf(
    num_classes: int = 10,
    stem: str = "cifar",
    columns: int = 4,
    width: float = RF_WIDTH,
    in_channels: int = 3,
    drop_path: float = 0.0,
    global_drop: float = 0.0,
    input_quantizer: str | None = "approx_sign",
    kernel_quantizer: str | None = "magnitude_aware_sign",
    attention: str = "none",
) -> FractalResNet:
    """SoFAr RF: Bi-Real ResNet with residual fractal stages (RF-c4d8, Bi-Real-18's OPs)."""
    return FractalResNet(
        columns,
        num_classes=num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        drop_path=drop_path,
        global_drop=global_drop,
        attention=attention,
    )


@register_model(family="sofar")
def sofar_drf(
    num_classes: int = 10,
    stem: str = "cifar",
    columns: int = 2,
    width: float = 1.0,
    growth: int = DRF_GROWTH,
    in_channels: int = 3,
    drop_path: float = 0.0,
    global_drop: float = 0.0,
    input_quantizer: str | None = "ste_sign",
    kernel_quantizer: str | None = "ste_sign",
    attention: str = "none",
) -> FractalDenseNet:
    """SoFAr DRF: BinaryDenseNet-28 with dense fractal blocks (DRF-c2d2, BDN-28's OPs)."""
    return FractalDenseNet(
        columns,
        num_classes=num_classes,
        stem=stem,
        width=width,
        growth=growth,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        drop_path=drop_path,
        global_drop=global_drop,
        attention=attention,
    )
