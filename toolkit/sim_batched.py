"""The batched engine of the gossip simulator: every node of a round in one computation.

:mod:`toolkit.simulate` runs a Python loop over nodes (train, encode, decode, merge, one node at
a time): the reference, and what the MQTT agent does. At 1,000 LeNet-5 nodes a third of that
loop's time goes to per-node bookkeeping. This engine keeps the ``N`` models as stacked tensors
(``name -> (N, ...)``) and runs

- training as one computation per chunk of nodes: :func:`torch.func.functional_call` of the same
  model (built by the loop's factory, :func:`toolkit.train.make_model`) under
  :func:`torch.func.vmap`, the loss summed over nodes and differentiated with
  :mod:`torch.autograd` (node ``n``'s loss depends on node ``n``'s parameters only, so each
  node gets its own gradient), then SGD with momentum, Nesterov and weight decay on the stacked
  tensors in ``torch.optim.SGD``'s order, and the binary layers' latent-weight clipping
  that :func:`models.training.train_steps` applies after each step;
- merging as sparse products with the neighbour matrix (:class:`NeighbourTable`): plain and
  variance-corrected averaging as :func:`edge_agent.merge.merge` computes them (float64, the
  same tensors rescaled, both rules: bitfleet's ``ddof=1`` with epsilon, DFL2's), and FedAvg's
  weighted or equal-weight mean;
- batches as the loop draws them (:class:`NodeBatches`: the same samplers and seeds, the
  augmentation's draws from each node's generator), gathered and augmented a chunk at a time;
- optionally, parts of the fleet in worker processes (``workers=2``: one torch thread each,
  tensors in shared memory), the better use of a second core for these small kernels.

Two layers of the model are swapped, inside this engine only, for exact equivalents that are
faster under ``vmap`` on a CPU (measured on 2 Zen 5 vCPUs, LeNet-5, batch 64), and a ReLU
followed by such a pooling runs after it instead (:func:`_pool_before_relu`):

- ``nn.Conv2d``: vmap's batching rule turns N convolutions into one grouped convolution, which
  oneDNN runs about 2x slower than N ordinary ones; the rule here runs one convolution per node
  (forward and backward are the loop's kernels);
- ``nn.MaxPool2d(2)``: ``max_pool2d``'s forward took 30% of a LeNet-5 step; here the maxima come
  from four strided views, the argmax (first maximum in scan order, as PyTorch's) from three
  comparisons, and the backward is PyTorch's own ``max_pool2d_with_indices_backward``.

Same seed, same results: parameters agree with the loop's within float tolerance (atol 1e-5;
measured ~3e-8 after a few rounds; tests/test_sim_batched.py). ``benchmarks/sim_scale.py``
measures node-steps per second against the loop (on 2 cores at 1,000 nodes: about 2x).

What the engine does not do, it refuses with a ValueError naming ``--engine loop``: message drops,
delays, churn, peer sampling, a trigger other than ``"all"``, codecs other than ``fp32`` (all of
which make nodes differ in what they receive), optimizers other than SGD, and models that
``vmap`` cannot run or whose training updates buffers (batch-norm running statistics, dropout's
randomness, custom autograd functions without a vmap rule such as the binary quantizers').
"""

from __future__ import annotations

import contextlib
import copy
import functools
import signal
import sys
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from edge_agent import codecs
from edge_agent.merge import EPS, RULES, VARIANCE_MODES, is_rescaled, keeps_own
from models.constraints import latent_weight_parameters
from models.training import BatchSampler

from .augment import affine_matrices, augment_draws

__all__ = [
    "ENGINE_HINT",
    "BatchedSimulation",
    "NeighbourTable",
    "StackedModels",
    "check_supported",
    "fedavg_average",
    "gossip_merge",
    "simulate_batched",
]

#: Appended to every refusal: the loop engine runs every setting.
ENGINE_HINT = "use --engine loop (the reference engine), which runs every setting"

#: Nodes trained (and evaluated) per vmapped call: small enough that a chunk's activations stay
#: in cache, large enough that per-call overhead is shared.
DEFAULT_CHUNK = 8

Stacked = dict[str, Tensor]


# ------------------------------------------------------------------------- which settings


def check_supported(config: Any) -> None:
    """Raise ValueError if the batched engine cannot run ``config`` exactly as the loop does.

    ``config`` is a :class:`toolkit.simulate.SimulationConfig`. The batched engine assumes every
    node receives every neighbour's model every round, as fp32, and merges at once.
    """
    problems = []
    if config.drop:
        problems.append(f"drop={config.drop}")
    if config.churn:
        problems.append(f"churn={config.churn}")
    if config.delay:
        problems.append(f"delay={config.delay}")
    if config.codec != "fp32":
        problems.append(f"codec={config.codec!r}")
    if config.optimizer != "sgd":
        problems.append(f"optimizer={config.optimizer!r}")
    if config.merge != "fedavg":
        if config.trigger != "all":
            problems.append(f"trigger={config.trigger!r}")
        if config.peers:
            problems.append(f"peers={config.peers}")
    if problems:
        raise ValueError(
            f"the batched engine cannot run {', '.join(problems)} (it models a fleet in which "
            f"every node receives every neighbour's fp32 model every round, trained with SGD); "
            f"{ENGINE_HINT}"
        )


# ------------------------------------------------------------------ fast, exact layers


class _PerNode(torch.autograd.Function):
    """``fn(x, weight, bias, *conf)`` (``F.conv2d``, ``F.linear``), run per node under vmap.

    The vmap rule makes one call per node instead of the default rule's grouped convolution
    (see the module doc); the per-node calls record their own autograd graph.
    """

    @staticmethod
    def forward(
        fn: Callable[..., Tensor],
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        conf: tuple[Any, ...],
    ) -> Tensor:
        return fn(x, weight, bias, *conf)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        fn, x, weight, bias, conf = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.fn, ctx.conf = fn, conf

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # reached outside vmap only (under vmap, the per-node calls record their own graph)
        inputs = [None if t is None else t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.fn(*inputs, *ctx.conf)
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, *(None if t is None else next(grads) for t in inputs), None)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        fn: Callable[..., Tensor],
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        conf: tuple[Any, ...],
    ) -> tuple[Tensor, int]:
        count = info.batch_size
        x_dim, w_dim, b_dim = in_dims[1:4]
        if fn is F.conv2d and x_dim is None and w_dim is not None and conf[3] == 1:
            # one input for every node (evaluation on the shared test set): one convolution
            # with every node's filters side by side
            w = weight.movedim(w_dim, 0)
            b = None if bias is None else _nodes_first(bias, b_dim, count)
            out = F.conv2d(x, w.flatten(0, 1), None if b is None else b.flatten(), *conf)
            out = out.unflatten(-3, (count, w.shape[1]))
            return out.movedim(-4, 0), 0
        xs = _nodes_first(x, x_dim, count)
        ws = _nodes_first(weight, w_dim, count)
        bs = None if bias is None else _nodes_first(bias, b_dim, count)
        outs = [fn(xs[i], ws[i], None if bs is None else bs[i], *conf) for i in range(count)]
        return torch.stack(outs), 0


def _nodes_first(t: Tensor, dim: int | None, count: int) -> Tensor:
    """``t`` with the vmapped dimension first (an unbatched ``t`` repeated, without a copy)."""
    return t.expand(count, *t.shape) if dim is None else t.movedim(dim, 0)


class _PerNodeConv2d(nn.Module):
    """Stands in for an ``nn.Conv2d`` (same parameter names) when batched.

    (Linear layers keep vmap's rule, a batched matmul: measured as fast as one call per node.)
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.conf = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        return _PerNode.apply(F.conv2d, x, self.weight, self.bias, self.conf)


def _pool_max(x: Tensor) -> Tensor:
    """2x2 max pooling, stride 2 (odd last rows and columns dropped): maxima of four views."""
    rows, cols = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    even = x[..., :rows, :cols]
    a, b = even[..., 0::2, 0::2], even[..., 0::2, 1::2]
    c, d = even[..., 1::2, 0::2], even[..., 1::2, 1::2]
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _pool_2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_pool_max` and the argmax ``max_pool2d`` would return.

    The argmax is the first maximum in scan order (a, b, c, d), as in PyTorch's kernel, found
    by counting the leading misses.
    """
    out = _pool_max(x)
    rows, cols = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    even = x[..., :rows, :cols]
    a, b, c = even[..., 0::2, 0::2], even[..., 0::2, 1::2], even[..., 1::2, 0::2]
    miss_a = a != out
    miss_ab = miss_a & (b != out)
    code = miss_a.to(torch.uint8) + miss_ab + (miss_ab & (c != out))  # 0..3: a, b, c, d
    width = x.shape[-1]
    corner = torch.arange(0, rows, 2).unsqueeze(1) * width + torch.arange(0, cols, 2)
    offset = torch.tensor([0, 1, width, width + 1])  # small integers until this one lookup
    return out, corner + offset[code.long()]


class _MaxPool2x2(torch.autograd.Function):
    """``max_pool2d(x, 2)`` with a faster forward; under vmap, nodes join the image batch."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return _pool_2x2(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> Tensor:
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, [2, 2], [2, 2], [0, 0], [1, 1], False, index
        )

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None], x: Tensor
    ) -> tuple[tuple[Tensor, Tensor], tuple[int | None, int | None]]:
        if in_dims[0] is None:
            out, index = _MaxPool2x2.apply(x)
            return (out, index), (None, None)
        x = x.movedim(in_dims[0], 0)
        lead = x.shape[:-3]
        out, index = _MaxPool2x2.apply(x.reshape(-1, *x.shape[-3:]))
        shape = (*lead, *out.shape[-3:])
        return (out.reshape(shape), index.reshape(shape)), (0, 0)


class _FastMaxPool2d(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # evaluation: no argmax needed
            return _pool_max(x)
        return _MaxPool2x2.apply(x)[0]


def _is_plain_pool(m: nn.Module) -> bool:
    if type(m) is not nn.MaxPool2d:
        return False
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return (
        pair(m.kernel_size) == (2, 2)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def _batched_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its plain convolutions and 2x2 max-pools swapped (see above)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if type(module) is nn.Conv2d and module.padding_mode == "zeros":
            replacement: nn.Module = _PerNodeConv2d(module)
        elif _is_plain_pool(module):
            replacement = _FastMaxPool2d()
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name), child, replacement)
    for module in twin.modules():
        if isinstance(module, nn.Sequential):
            _pool_before_relu(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _pool_before_relu(sequence: nn.Sequential) -> None:
    """Swap every ``ReLU, 2x2 max-pool`` pair of ``sequence`` to ``max-pool, ReLU``.

    The same values (ReLU is monotone, so it commutes with a maximum) and the same gradients (a
    window whose maximum is positive routes it to the same first maximum either way; one whose
    maximum is not positive passes no gradient either way), for a quarter of the ReLU's work
    and memory traffic: 12% more node-steps per second on LeNet-5.
    """
    keys = list(sequence._modules)
    for first, second in zip(keys, keys[1:], strict=False):
        a, b = sequence._modules[first], sequence._modules[second]
        if type(a) is nn.ReLU and isinstance(b, _FastMaxPool2d):
            sequence._modules[first], sequence._modules[second] = b, a


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class _SGD:
    """One tensor's ``torch.optim.SGD`` settings (its parameter group's)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


def _sgd_settings(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, _SGD]:
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(
            f"the batched engine runs SGD only, not {type(optimizer).__name__}; {ENGINE_HINT}"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    settings = {}
    for group in optimizer.param_groups:
        sgd = _SGD(
            float(group["lr"]),
            float(group["momentum"]),
            float(group["dampening"]),
            float(group["weight_decay"]),
            bool(group["nesterov"]),
            bool(group["maximize"]),
        )
        for p in group["params"]:
            settings[names[id(p)]] = sgd
    return settings


class StackedModels:
    """``N`` models of one architecture as stacked tensors, trained with per-node SGD.

    Built from the loop's own models and optimizers (:meth:`from_modules`), so both engines
    start from the same weights, hyperparameters and momentum buffers. Parameters and buffers
    are ``name -> (N, ...)`` tensors; :meth:`state` gives them in ``state_dict`` order.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Stacked,
        buffers: Stacked,
        sgd: Mapping[str, _SGD],
        momentum: Mapping[str, Tensor],
        started: bool,
        sample_shape: Sequence[int],
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        _check_buffers(model)
        self.model = model
        self.params = params
        self.buffers = buffers
        self.sgd = dict(sgd)
        # a buffer per parameter with momentum; until the first step (``started``) it is
        # unused, and the first step sets it to the gradient, as torch.optim.SGD does
        self.momentum = dict(momentum)
        self.started = started
        self.sample_shape = tuple(sample_shape)
        self.chunk = chunk
        self.order = list(model.state_dict())
        self.count = len(next(iter(params.values())))
        latent = {id(p): bound for p, bound in latent_weight_parameters(model)}
        self.clip = {n: latent[id(p)] for n, p in model.named_parameters() if id(p) in latent}
        self._train_twin = _batched_twin(model).train()
        self._eval_twin = _batched_twin(model).eval()
        self._probe(tuple(sample_shape))

    @classmethod
    def from_modules(
        cls,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        sample_shape: Sequence[int],
        chunk: int = DEFAULT_CHUNK,
    ) -> StackedModels:
        """Stack ``models`` (one architecture) and their SGD optimizers' settings and state.

        Raises ValueError (naming ``--engine loop``) for an optimizer other than SGD, settings
        that differ between nodes, or a model the engine cannot run.
        """
        if len(models) == 0 or len(models) != len(optimizers):
            raise ValueError("from_modules needs one optimizer per model, and a model")
        first = models[0]
        sgd = _sgd_settings(first, optimizers[0])
        for model, optimizer in zip(models[1:], optimizers[1:], strict=True):
            if _sgd_settings(model, optimizer) != sgd:
                raise ValueError(f"nodes differ in their SGD settings; {ENGINE_HINT}")
        params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
            for name, _ in first.named_parameters()
        }
        buffers = {
            name: torch.stack([dict(m.named_buffers())[name].detach() for m in models])
            for name, _ in first.named_buffers()
        }
        momentum: dict[str, Tensor] = {}
        started: set[bool] = set()
        for name, _ in first.named_parameters():
            if sgd[name].momentum == 0:
                continue
            bufs = [
                opt.state.get(dict(m.named_parameters())[name], {}).get("momentum_buffer")
                for m, opt in zip(models, optimizers, strict=True)
            ]
            started.update(b is not None for b in bufs)
            if len(started) > 1:
                raise ValueError(f"nodes differ in their optimizer state; {ENGINE_HINT}")
            momentum[name] = (
                torch.stack([b.detach() for b in bufs if b is not None])
                if bufs[0] is not None
                else torch.zeros_like(params[name])
            )
        return cls(first, params, buffers, sgd, momentum, True in started, sample_shape, chunk)

    def nodes(self, start: int, stop: int) -> StackedModels:
        """The nodes ``start .. stop - 1`` as a StackedModels whose tensors are views of these.

        Training the part trains these nodes here too (a worker process trains its part of
        tensors in shared memory, :meth:`share_memory`).
        """

        def part(tensors: Mapping[str, Tensor]) -> Stacked:
            return {name: t[start:stop] for name, t in tensors.items()}

        return StackedModels(
            self.model,
            part(self.params),
            part(self.buffers),
            self.sgd,
            part(self.momentum),
            self.started,
            self.sample_shape,
            self.chunk,
        )

    def share_memory(self) -> None:
        """Move every stacked tensor to shared memory, for worker processes (in place)."""
        for tensors in (self.params, self.buffers, self.momentum):
            for t in tensors.values():
                t.share_memory_()

    # -- one SGD step per node

    def train_step(self, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
        """One SGD step of every node, node ``n`` on ``batches[n] = (x, y)``.

        Nodes whose batches have the same size are stacked and run together, ``chunk`` at a
        time; the loss of each is the mean cross-entropy of its batch, as in ``train_steps``.
        """
        if len(batches) != self.count:
            raise ValueError(f"got {len(batches)} batches for {self.count} nodes")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for node, (x, _) in enumerate(batches):
            by_size.setdefault(tuple(x.shape), []).append(node)
        first = self._start_momentum()
        for nodes in by_size.values():
            for start in range(0, len(nodes), self.chunk):
                part = nodes[start : start + self.chunk]
                x = torch.stack([batches[n][0] for n in part])
                y = torch.stack([batches[n][1] for n in part])
                self._step(torch.tensor(part), x, y, first)

    def train_stacked(self, batch: StackedBatch) -> None:
        """One SGD step of every node on its batch of ``batch`` (all of one size)."""
        if len(batch) != self.count:
            raise ValueError(f"got batches for {len(batch)} nodes, not {self.count}")
        first = self._start_momentum()
        for start in range(0, self.count, self.chunk):
            stop = min(start + self.chunk, self.count)
            self._step(torch.arange(start, stop), *batch.take(start, stop), first)

    def _start_momentum(self) -> bool:
        """Whether this is the first step, which starts the momentum buffers.

        All nodes step together, so one flag serves them all.
        """
        first, self.started = not self.started, True
        return first

    def train(self, streams: Sequence[Iterator[tuple[Tensor, Tensor]]], steps: int) -> None:
        """``steps`` SGD steps of every node, each on the next batch of the node's stream."""
        for _ in range(steps):
            self.train_step([next(s) for s in streams])

    def _step(self, nodes: Tensor, x: Tensor, y: Tensor, first: bool) -> None:
        params = {n: t.index_select(0, nodes).requires_grad_() for n, t in self.params.items()}
        buffers = {n: t.index_select(0, nodes) for n, t in self.buffers.items()}
        logits = self._forward(self._train_twin, params, buffers, x, 0)
        # the sum of per-node means: node n's gradient is that of its own mean loss
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        grads = torch.autograd.grad(loss.view(y.shape).mean(1).sum(), list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                self._sgd_update(name, nodes, p.detach(), g, first)

    def _sgd_update(self, name: str, nodes: Tensor, p: Tensor, grad: Tensor, first: bool) -> None:
        """``torch.optim.SGD``'s update (weight decay, momentum, Nesterov) for these nodes."""
        s = self.sgd[name]
        d_p = -grad if s.maximize else grad
        if s.weight_decay != 0:
            d_p = d_p.add(p, alpha=s.weight_decay)
        if s.momentum != 0:
            stacked = self.momentum[name]
            if first:  # the buffer starts as the gradient
                buf = d_p.clone()
            else:
                buf = stacked.index_select(0, nodes)
                buf.mul_(s.momentum).add_(d_p, alpha=1 - s.dampening)
            stacked.index_copy_(0, nodes, buf)
            d_p = d_p.add(buf, alpha=s.momentum) if s.nesterov else buf
        p = p.add(d_p, alpha=-s.lr)
        if name in self.clip:
            p = p.clamp(-self.clip[name], self.clip[name])
        self.params[name].index_copy_(0, nodes, p)

    def _forward(
        self, twin: nn.Module, params: Stacked, buffers: Stacked, x: Tensor, x_dim: int | None
    ) -> Tensor:
        def one(p: Stacked, b: Stacked, xi: Tensor) -> Tensor:
            return functional_call(twin, (p, b), (xi,))

        return vmap(one, in_dims=(0, 0, x_dim), randomness="error")(params, buffers, x)

    def _probe(self, sample_shape: tuple[int, ...]) -> None:
        """Run two nodes once on zeros, to refuse a model vmap cannot run with a clear error."""
        nodes = torch.arange(min(2, self.count))
        params = {n: t.index_select(0, nodes).requires_grad_() for n, t in self.params.items()}
        buffers = {n: t.index_select(0, nodes) for n, t in self.buffers.items()}
        x = torch.zeros(len(nodes), 2, *sample_shape)
        try:
            out = self._forward(self._train_twin, params, buffers, x, 0)
            torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"the batched engine cannot run this model under torch.func.vmap ({reason}); "
                f"{ENGINE_HINT}"
            ) from None

    # -- evaluation and state

    @torch.no_grad()
    def accuracies(
        self, x: Tensor, y: Tensor, nodes: Sequence[int] | None = None, batch_size: int = 128
    ) -> np.ndarray:
        """Top-1 accuracy of each node on ``(x, y)`` in eval mode (as ``evaluate``).

        Test images go ``batch_size`` at a time (smaller than ``evaluate``'s 512: a chunk of
        nodes' activations then stay in cache; the accuracies do not depend on it).
        """
        chosen = list(range(self.count)) if nodes is None else list(nodes)
        correct = np.zeros(len(chosen), dtype=np.int64)
        for start in range(0, len(chosen), self.chunk):
            part = torch.tensor(chosen[start : start + self.chunk])
            params = {n: t.index_select(0, part) for n, t in self.params.items()}
            buffers = {n: t.index_select(0, part) for n, t in self.buffers.items()}
            hits = torch.zeros(len(part), dtype=torch.int64)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
                logits = self._forward(self._eval_twin, params, buffers, xb, None)
                hits += (logits.argmax(-1) == yb).sum(1)
            correct[start : start + len(part)] = hits.numpy()
        return correct / len(y)

    def state(self) -> Stacked:
        """Every node's ``state_dict`` stacked, ``name -> (N, ...)``, in ``state_dict`` order."""
        merged = {**self.params, **self.buffers}
        return {name: merged[name] for name in self.order}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Set every node's parameters and buffers from ``name -> (N, ...)``.

        One model's ``name -> (...)`` is broadcast to every node. Optimizer state (momentum)
        is kept, as the loop's optimizers keep theirs when a merge loads new weights.
        """
        for name, value in state.items():
            target = self.params[name] if name in self.params else self.buffers[name]
            target.copy_(value.expand_as(target))  # in place: workers share these tensors

    def node_states(self) -> list[dict[str, np.ndarray]]:
        """Each node's state as ``name -> numpy array`` (the loop's ``state_to_numpy``)."""
        arrays = {name: t.numpy() for name, t in self.state().items()}
        return [{n: a[i].copy() for n, a in arrays.items()} for i in range(self.count)]


def _check_buffers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ValueError(
                f"the batched engine does not update batch-norm running statistics (layer "
                f"{name!r} of {type(model).__name__}); {ENGINE_HINT}"
            )


# ------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class NeighbourTable:
    """Who each node merges, and with which weight.

    ``index[n, j]`` is node ``n``'s ``j``-th neighbour in the order the Merger sums them
    (sorted by sender name, the decimal node number as a string); ``weight[n, j]`` is its weight
    in the mean, ``1 / degree(n)``, and 0 for padding (which points at node ``n`` itself), so
    irregular graphs need no special case. ``matrix`` is the same as a sparse ``(N, N)`` row
    (CSR) matrix: the mean of the neighbours' tensors is one sparse product with it.
    """

    index: Tensor  # (N, D) int64
    weight: Tensor  # (N, D) float64
    matrix: Tensor  # (N, N) float64, sparse CSR
    block: int = 8  # rows per block of :meth:`blocks`

    @classmethod
    def from_lists(cls, neighbours: Sequence[Sequence[int]]) -> NeighbourTable:
        if any(len(peers) == 0 for peers in neighbours):
            raise ValueError("every node needs at least one neighbour to merge")
        count, width = len(neighbours), max(len(peers) for peers in neighbours)
        index = torch.zeros(count, width, dtype=torch.int64)
        weight = torch.zeros(count, width, dtype=torch.float64)
        rows, columns, values = [0], [], []
        for node, peers in enumerate(neighbours):
            ordered = sorted((int(p) for p in peers), key=str)
            index[node] = torch.tensor(ordered + [node] * (width - len(ordered)))
            weight[node, : len(ordered)] = 1.0 / len(ordered)
            columns += sorted(ordered)
            values += [1.0 / len(ordered)] * len(ordered)
            rows.append(len(columns))
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is not
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                torch.tensor(rows),
                torch.tensor(columns, dtype=torch.int64),
                torch.tensor(values, dtype=torch.float64),
                (count, count),
            )
        return cls(index, weight, matrix)

    def mean(self, rows: Tensor, nodes: slice | None = None) -> Tensor:
        """The weighted mean of each node's neighbours' ``rows`` (``(N, K)`` float64).

        Only for the nodes of ``nodes`` (a slice of whole :meth:`blocks`) when given.
        """
        if nodes is None:
            return torch.sparse.mm(self.matrix, rows)
        return torch.sparse.mm(self._blocks[nodes.start // self.block], rows)

    def blocks(self) -> Iterator[slice]:
        """Consecutive ranges of ``block`` nodes.

        A merge works one block at a time, so that its float64 temporaries stay in cache.
        """
        count = len(self.index)
        return (slice(i, min(i + self.block, count)) for i in range(0, count, self.block))

    @functools.cached_property
    def _blocks(self) -> list[Tensor]:
        crow, col, val = (
            self.matrix.crow_indices(),
            self.matrix.col_indices(),
            self.matrix.values(),
        )
        out = []
        for rows in self.blocks():
            lo, hi = int(crow[rows.start]), int(crow[rows.stop])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out.append(
                    torch.sparse_csr_tensor(
                        crow[rows.start : rows.stop + 1] - lo,
                        col[lo:hi],
                        val[lo:hi],
                        (rows.stop - rows.start, len(self.index)),
                    )
                )
        return out


def gossip_merge(
    state: Mapping[str, Tensor],
    table: NeighbourTable,
    method: str = "vc",
    self_weight: float = 0.5,
    variance: str = "others",
    no_rescale: Sequence[str] = (),
    rule: str = "bitfleet",
) -> Stacked:
    """Every node merges all its neighbours' models at once, as ``Merger.merge_into`` does.

    ``state`` is ``name -> (N, ...)``; the result has the same names, shapes and dtypes. The
    arithmetic is :func:`edge_agent.merge.merge`'s: float64, ``s * own + (1 - s) * mean``,
    then for ``"vc"`` each rescaled tensor moved to the target variance by ``rule``:
    ``"bitfleet"`` (``ddof=1``, :data:`edge_agent.merge.EPS`) or ``"dfl2"`` (biases not
    rescaled, ``ddof=0``, no epsilon, a mix without spread left as it is). Batch-norm statistics
    and counters are kept from the own model. The neighbours' mean is a sparse product
    (:meth:`NeighbourTable.mean`), so it sums in node order where the Merger sums in sender-name
    order: the float64 results differ in the last bits, float32 ones hardly ever.
    """
    if method not in ("avg", "vc"):
        raise ValueError(f"unknown merge method {method!r}; valid: avg, vc")
    if variance not in VARIANCE_MODES:
        raise ValueError(f"unknown variance mode {variance!r}; valid: {', '.join(VARIANCE_MODES)}")
    if rule not in RULES:
        raise ValueError(f"unknown rescaling rule {rule!r}; valid: {', '.join(RULES)}")
    if not 0.0 <= self_weight < 1.0:
        raise ValueError(f"self_weight must be in [0, 1), not {self_weight!r}")
    s = float(self_weight)
    exempt = frozenset(no_rescale)
    if rule == "dfl2":  # weights only
        exempt = exempt | {name for name in state if name.endswith("bias")}
    ddof = 1 if rule == "bitfleet" else 0
    merged: Stacked = {}
    for name, stacked in state.items():
        if keeps_own(name):
            merged[name] = stacked.clone()
            continue
        flat = stacked.reshape(len(stacked), -1).to(torch.float64)
        rescale = (
            method == "vc"
            and name not in exempt
            and is_rescaled(name, np.empty(stacked.shape[1:], _numpy_dtype(stacked.dtype)))
        )
        own_var = (
            torch.cat([_row_var(flat[rows], ddof) for rows in table.blocks()]) if rescale else None
        )
        out = torch.empty(flat.shape, dtype=stacked.dtype)
        for rows in table.blocks():
            mixed = flat[rows] * s + table.mean(flat, rows) * (1.0 - s)
            if own_var is not None:
                others = table.mean(own_var.unsqueeze(1), rows).squeeze(1)
                if variance == "others":
                    target = others
                elif variance == "self":
                    target = own_var[rows]
                else:  # conservative
                    target = s * own_var[rows] + (1.0 - s) * others
                center = mixed.mean(dim=1, keepdim=True)
                spread = mixed - center
                if rule == "bitfleet":
                    scale = torch.sqrt((target + EPS) / (_row_var(mixed, 1) + EPS))
                else:  # dfl2: no epsilon; a mix with no spread has nothing to stretch
                    var = _row_var(mixed, 0)
                    scale = torch.where(var > 0, torch.sqrt(target / var), 1.0)
                mixed = spread.mul_(scale.unsqueeze(1)).add_(center)
            out[rows] = _cast(mixed, stacked.dtype)
        merged[name] = out.reshape(stacked.shape)
    return merged


def _row_var(rows: Tensor, ddof: int) -> Tensor:
    """Each row's variance as numpy's ``var`` takes it: squared deviations from the mean."""
    spread = rows - rows.mean(dim=1, keepdim=True)
    return (spread * spread).sum(dim=1) / (rows.shape[1] - ddof)


def fedavg_average(state: Mapping[str, Tensor], weights: Sequence[float] | None = None) -> Stacked:
    """FedAvg's server model: the weighted mean over nodes of every tensor, one model.

    As :func:`edge_agent.merge.weighted_average`: float64, weights normalised to sum 1 (equal
    when None), every tensor averaged (batch-norm statistics too), integers rounded half to
    even. ``state`` is ``name -> (N, ...)``; the result is ``name -> (...)``.
    """
    count = len(next(iter(state.values())))
    if weights is None:
        w = torch.full((count,), 1.0 / count, dtype=torch.float64)
    else:
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        if w.shape != (count,) or not bool(torch.all(torch.isfinite(w) & (w > 0))):
            raise ValueError(f"need {count} positive finite weights, got {list(weights)}")
        w = w / w.sum()
    return {
        name: _cast((w @ t.reshape(count, -1).to(torch.float64)).reshape(t.shape[1:]), t.dtype)
        for name, t in state.items()
    }


def _cast(value: Tensor, dtype: torch.dtype) -> Tensor:
    if not (dtype.is_floating_point or dtype.is_complex):
        value = torch.round(value)  # half to even, as numpy's rint
    return value.to(dtype)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


# ---------------------------------------------------------------------------- simulation


class NodeBatches:
    """Every node's next training batch, drawn as the loop's streams draw them, built at once.

    ``nodes`` limits it to some nodes (a worker process's part of the fleet).

    The loop's fleet gives node ``n`` a :class:`models.training.BatchSampler` stream seeded by
    ``seed * 7919 + n`` (``endless`` over its shard, or ``pooled`` with its label
    probabilities) and, with ``augment``, a torch generator of the same seed for
    :func:`toolkit.augment.augment_batch`. Here the samplers run over sample *positions*, so
    they yield the very indices the loop's streams gather; the images of all nodes are then
    gathered in one indexing, and augmented in one resampling with each node's angles and shifts
    drawn from its own generator in augment_batch's order. The result equals the loop's batches
    (tests/test_sim_batched.py runs both engines on the paper preset, augmentation included).
    """

    def __init__(
        self,
        config: Any,
        train: Any,
        shards: Sequence[np.ndarray] | None,
        label_probs: np.ndarray | None,
        nodes: Sequence[int] | None = None,
    ) -> None:
        positions = np.arange(len(train.x))
        self.x = torch.as_tensor(train.x)
        self.sources: list[Iterator[tuple[Tensor, Tensor]]] = []
        self.generators: list[torch.Generator] = []
        for node in range(config.nodes) if nodes is None else nodes:
            data_seed = config.seed * 7_919 + node
            rng = np.random.default_rng(data_seed)
            if label_probs is not None:
                sampler = BatchSampler(positions, train.y, config.batch_size)
                self.sources.append(sampler.pooled(label_probs[node], rng))
            else:
                assert shards is not None
                sampler = BatchSampler(positions, train.y, config.batch_size, shards[node])
                self.sources.append(sampler.endless(rng))
            if config.augment:
                self.generators.append(torch.Generator().manual_seed(data_seed))
        self.fill = torch.tensor([-m / s for m, s in zip(train.mean, train.std, strict=True)])

    def next(self) -> StackedBatch | list[tuple[Tensor, Tensor]]:
        """The next batch of every node: a :class:`StackedBatch`.

        ``(x, y)`` pairs instead if the nodes' batch sizes differ (shards smaller than a batch).
        """
        drawn = [next(source) for source in self.sources]
        if len({len(index) for index, _ in drawn}) > 1:
            pairs = []
            for node, (index, labels) in enumerate(drawn):
                x = self.x[index]
                if self.generators:
                    x = _augment(x, *augment_draws(len(x), self.generators[node]), self.fill)
                pairs.append((x, labels))
            return pairs
        index = torch.stack([index for index, _ in drawn])
        angles = shifts = None
        if self.generators:
            draws = [augment_draws(index.shape[1], g) for g in self.generators]
            angles = torch.cat([angle for angle, _ in draws])
            shifts = torch.cat([shift for _, shift in draws])
        labels = torch.stack([labels for _, labels in drawn])
        return StackedBatch(self.x, index, labels, angles, shifts, self.fill)


@dataclass(frozen=True)
class StackedBatch:
    """One batch per node, all of one size, whose images are made a part of the fleet at a time.

    The indices and the augmentation's random draws are taken for every node at once (in the
    loop's order); gathering and resampling the images waits for :meth:`take`, so that a chunk
    of nodes' images is made right before it trains, while it fits in cache.
    """

    images: Tensor  # the training split
    index: Tensor  # (N, B)
    labels: Tensor  # (N, B)
    angles: Tensor | None  # (N * B,), or None without augmentation
    shifts: Tensor | None  # (N * B, 2)
    fill: Tensor

    def __len__(self) -> int:
        return len(self.index)

    def take(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Images ``(n, B, C, H, W)`` and labels ``(n, B)`` of nodes ``start .. stop - 1``."""
        index = self.index[start:stop]
        x = self.images[index]
        if self.angles is not None and self.shifts is not None:
            size = index.shape[1]
            rows = slice(start * size, start * size + index.numel())
            moved = _augment(x.flatten(0, 1), self.angles[rows], self.shifts[rows], self.fill)
            x = moved.unflatten(0, index.shape)
        return x, self.labels[start:stop]


def _augment(x: Tensor, angle: Tensor, shift: Tensor, fill: Tensor, chunk: int = 512) -> Tensor:
    """The geometric part of :func:`toolkit.augment.augment_batch`, ``chunk`` images at a time.

    The same affine matrices and bilinear resampling; the sampling grid is written out (what
    ``affine_grid`` computes with a batched matmul, slow on a CPU for a 3-term product).
    """
    n, channels, height, width = x.shape
    theta = affine_matrices(angle, shift, height, width, x.dtype)
    # affine_grid's base grid (align_corners=False): pixel centres in [-1, 1]
    xs = (torch.linspace(-1, 1, width, dtype=x.dtype) * ((width - 1) / width)).view(1, 1, width)
    ys = (torch.linspace(-1, 1, height, dtype=x.dtype) * ((height - 1) / height)).view(1, -1, 1)
    base = fill.to(x.dtype).reshape(-1, 1, 1)
    out = torch.empty_like(x)
    for start in range(0, n, chunk):
        t = theta[start : start + chunk].reshape(-1, 1, 1, 2, 3)
        grid = torch.stack(
            [
                t[..., 0, 0] * xs + t[..., 0, 1] * ys + t[..., 0, 2],
                t[..., 1, 0] * xs + t[..., 1, 1] * ys + t[..., 1, 2],
            ],
            dim=-1,
        )
        moved = F.grid_sample(
            x[start : start + chunk] - base,
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        out[start : start + chunk] = moved + base
    return out


class _WorkerPool:
    """Processes that train (and evaluate) contiguous parts of the fleet side by side.

    The stacked tensors live in shared memory; worker ``i`` holds views of its nodes
    (:meth:`StackedModels.nodes`), draws its nodes' batches (:class:`NodeBatches`, seeded per
    node, so the split does not change them) and runs torch on one thread. Merging stays in
    the parent, between rounds. Used when there are more cores than one: a second core speeds
    small per-node kernels up far less than a second process does.
    """

    def __init__(
        self, count: int, models: StackedModels, batches: dict[str, Any], eval_set: Any
    ) -> None:
        models.share_memory()
        context = torch.multiprocessing.get_context(
            "spawn"
        )  # forking a process that ran OpenMP hangs
        bounds = np.linspace(0, models.count, count + 1).round().astype(int)
        self.parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        with _main_module_hidden():
            for start, stop in self.parts:
                here, there = context.Pipe()
                process = context.Process(
                    target=_worker,
                    args=(there, models, start, stop, batches, eval_set),
                    daemon=True,
                )
                process.start()
                there.close()
                self.pipes.append(here)
                self.processes.append(process)
        self._finalizer = weakref.finalize(self, _stop_workers, self.pipes, self.processes)
        self.ask("ready")

    def ask(self, command: str, *args: Any) -> list[Any]:
        """Send ``command`` to every worker and return their answers, in node order."""
        answers = []
        try:
            for pipe in self.pipes:
                pipe.send((command, args))
            for pipe, process in zip(self.pipes, self.processes, strict=True):
                while not pipe.poll(1.0):  # a worker that dies never answers
                    if not process.is_alive():
                        raise EOFError
                status, value = pipe.recv()
                if status != "ok":
                    self.close()
                    raise RuntimeError(f"a batched-engine worker failed:\n{value}")
                answers.append(value)
        except (OSError, EOFError):  # a broken pipe, a reset connection: a dead worker
            codes = [p.exitcode for p in self.processes if not p.is_alive()]
            self.close()
            raise RuntimeError(
                f"a batched-engine worker process died (exit codes {codes})"
            ) from None
        return answers

    def close(self) -> None:
        self._finalizer()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start spawned workers without re-running the parent's ``__main__`` in them.

    ``spawn`` re-imports the main module in every child, which runs a script without an
    ``if __name__ == "__main__"`` guard, or ``python -m toolkit.cli`` (the CLI itself), again.
    The workers need nothing from it (their code is this module's), so the main module's name
    and path are hidden while they start.
    """
    main = sys.modules["__main__"]
    saved: dict[str, Any] = {
        key: main.__dict__[key] for key in ("__spec__", "__file__") if key in main.__dict__
    }
    main.__dict__["__spec__"] = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _stop_workers(pipes: list[Any], processes: list[Any]) -> None:
    for pipe in pipes:
        try:
            pipe.send(("stop", ()))
        except (BrokenPipeError, OSError):
            pass
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()


def _worker(
    pipe: Any,
    models: StackedModels,
    start: int,
    stop: int,
    batches: dict[str, Any],
    eval_set: Any,
) -> None:
    """A worker process's loop: answer the parent's commands until ``stop``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    torch.set_num_threads(1)
    try:
        part = models.nodes(start, stop)
        source = NodeBatches(**batches, nodes=range(start, stop))
    except Exception:  # reported to the parent, which raises it
        pipe.send(("error", traceback.format_exc()))
        return
    while True:
        command, args = pipe.recv()
        if command == "stop":
            return
        try:
            value = None
            if command == "train":
                for _ in range(args[0]):
                    _train_on(part, source.next())
            elif command == "eval":
                value = part.accuracies(*eval_set)
            pipe.send(("ok", value))
        except Exception:
            pipe.send(("error", traceback.format_exc()))


def _train_on(models: StackedModels, batch: StackedBatch | list[tuple[Tensor, Tensor]]) -> None:
    if isinstance(batch, list):
        models.train_step(batch)
    else:
        models.train_stacked(batch)


class BatchedSimulation:
    """One simulated fleet on the batched engine, a round at a time.

    Built from the config exactly as :func:`toolkit.simulate.simulate` builds the loop's fleet
    (the loop's own ``_Fleet``: models with their initialisation, optimizers, FedAvg weights),
    then stacked; the batches come from :class:`NodeBatches`, the loop's draws built at once.
    :meth:`train_round` and :meth:`merge_round` are the two halves of a round (the benchmark
    times them apart), :meth:`record` one history record.
    """

    def __init__(
        self,
        config: Any,
        train: Any = None,
        test: Any = None,
        chunk: int = DEFAULT_CHUNK,
        workers: int = 1,
    ) -> None:
        # the loop's module owns the config and builds the fleet; imported here, as it will
        # import this module to offer the engine
        from .simulate import _eval_set, _Fleet, load_dataset, parse_partition, parse_topology

        check_supported(config)
        self.config = config
        train = train or load_dataset(config.dataset, "train", root=config.data_root)
        test = test or load_dataset(config.dataset, "test", root=config.data_root)
        self.eval_x, self.eval_y = (torch.as_tensor(a) for a in _eval_set(config, test))
        spec = parse_partition(config.data)
        shards, probs = spec.assign(train.y, config.nodes, seed=config.seed)
        self.fleet = _Fleet(config, train, shards, probs)
        self.batches = NodeBatches(config, train, shards, probs)
        self.models = StackedModels.from_modules(
            self.fleet.models, self.fleet.optimizers, tuple(train.x.shape[1:]), chunk
        )
        self.fleet.models, self.fleet.optimizers = [], []  # the stacked copy is the fleet now
        self.pool = None
        if workers > 1 and config.nodes > 1:
            source = {"config": config, "train": train, "shards": shards, "label_probs": probs}
            self.pool = _WorkerPool(
                min(workers, config.nodes), self.models, source, (self.eval_x, self.eval_y)
            )
        payload = codecs.encoded_size(
            {n: t[0].numpy() for n, t in self.models.state().items()},
            config.codec,
            self.fleet.binary_names,
        )
        self.fedavg = config.merge == "fedavg"
        if self.fedavg:
            self.server = {n: t[0].clone() for n, t in self.models.state().items()}
            self.bytes_per_round = 2 * payload * config.nodes  # model down, update up
        else:
            topology = parse_topology(config.topology, config.nodes, seed=config.seed)
            self.table = NeighbourTable.from_lists(topology.neighbours)
            self.bytes_per_round = payload * sum(len(p) for p in topology.neighbours)

    def train_round(self) -> None:
        """Every node's ``local_steps`` SGD steps (FedAvg clients start from the server)."""
        if self.fedavg:
            self.models.load_state(self.server)
        if self.pool is not None:
            self.pool.ask("train", self.config.local_steps)
            return
        for _ in range(self.config.local_steps):
            _train_on(self.models, self.batches.next())

    def merge_round(self) -> int:
        """Every node merges its neighbours' models (FedAvg: the server averages); bytes sent."""
        config = self.config
        if self.fedavg:
            self.server.update(fedavg_average(self.models.state(), self.fleet.sample_weights))
            self.models.load_state(self.server)
        else:
            merged = gossip_merge(
                self.models.state(),
                self.table,
                config.merge,
                config.self_weight,
                config.variance,
                () if config.rescale_binary else self.fleet.binary_names,
                config.vc_rule,
            )
            self.models.load_state(merged)
        return self.bytes_per_round

    def accuracies(self) -> np.ndarray:
        """Every node's accuracy on the evaluation set (the workers' parts, if any)."""
        if self.pool is not None:
            return np.concatenate(self.pool.ask("eval"))
        return self.models.accuracies(self.eval_x, self.eval_y)

    def close(self) -> None:
        """Stop the worker processes, if any (also done when the simulation is collected)."""
        if self.pool is not None:
            self.pool.close()

    def record(self, round_index: int, sent: int) -> dict[str, Any]:
        """The loop's history record of this round (FedAvg: the one global model after 0)."""
        if self.fedavg and round_index:
            accuracies = self.models.accuracies(self.eval_x, self.eval_y, [0])
        else:
            accuracies = self.accuracies()
        return {
            "round": round_index,
            "steps": round_index * self.config.local_steps,
            "mean_accuracy": float(np.mean(accuracies)),
            "min_accuracy": float(np.min(accuracies)),
            "max_accuracy": float(np.max(accuracies)),
            "bytes_sent": sent,
            "variance": _mean_variance(self.models.state()),
        }


def simulate_batched(
    config: Any,
    *,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    train_data: Any = None,
    test_data: Any = None,
    chunk: int = DEFAULT_CHUNK,
    workers: int = 1,
) -> Any:
    """:func:`toolkit.simulate.simulate` on the batched engine: same config, same result.

    ``workers`` > 1 trains and evaluates parts of the fleet in that many processes (one torch
    thread each): the way to use a second core (see :class:`_WorkerPool`).

    Returns a :class:`toolkit.simulate.SimulationResult` whose history has the loop's records
    (agreeing within float tolerance). Raises ValueError naming ``--engine loop`` for a
    setting the engine cannot run (:func:`check_supported`).
    """
    from .simulate import SimulationResult

    run = BatchedSimulation(config, train_data, test_data, chunk, workers)
    try:
        history: list[dict[str, Any]] = []
        sent = 0
        for round_index in range(0, config.rounds + 1):
            # round 0 records the initial models, before any training or merging
            if round_index:
                run.train_round()
                sent += run.merge_round()
            if round_index % config.eval_every and round_index != config.rounds:
                continue
            record = run.record(round_index, sent)
            history.append(record)
            if progress is not None:
                progress(round_index, record)
        return SimulationResult(config, history, run.models.node_states())
    finally:
        run.close()


def _mean_variance(state: Mapping[str, Tensor]) -> dict[str, float]:
    """The loop's record: mean over nodes of each rescaled tensor's variance (ddof 1)."""
    out = {}
    for name, t in state.items():
        if is_rescaled(name, np.empty(t.shape[1:], _numpy_dtype(t.dtype))):
            flat = t.reshape(len(t), -1).to(torch.float64)
            out[name] = float(flat.var(dim=1, correction=1).mean())
    return out
