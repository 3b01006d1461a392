"""What every sensitivity method shares: options, the working context, groups, deltas and activation taps.

A method receives a :class:`Context`: a private, calibrated copy of the fake-quantized model (every quantizer
off), the sample it may read, the per-sample loss, and a progress callback. It returns per-layer
:class:`~.table.LayerScores`; the driver in ``__init__`` wraps them into a table.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpqc.compiler.ir import Graph, Op
from mpqc.compiler.quantize import ActQuantizer, QuantizedModel, _key
from mpqc.errors import UserError
from mpqc.kernels import fake_quant

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, target) -> per-sample loss

GRANULARITIES = ("layer", "channel")
DEFAULT_CANDIDATES = (8, 6, 5, 4, 3, 2)


@dataclass(frozen=True)
class SensitivityOptions:
    """Options common to every method; ``extra`` holds the method's own (see ``METHODS[name].defaults``).

    ``samples`` is how many samples a method reads (the calibration split, topped up from the training split;
    the held-out split for ``eval``; the training split for the methods that train). ``device`` is not part of
    the cache key.
    """

    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    granularity: str = "layer"
    samples: int = 512
    batch_size: int = 64
    seed: int = 0
    act_groups: str = "tensor"
    target: str | None = None
    device: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        cands = tuple(int(b) for b in self.candidates)
        if not cands:
            raise UserError("--candidates: give at least one bit-width, e.g. 8,6,4")
        bad = [b for b in cands if not 2 <= b <= 16]
        if bad:
            raise UserError(f"--candidates: bit-width {bad[0]} is outside 2..16")
        if len(set(cands)) != len(cands):
            raise UserError("--candidates: a bit-width is listed twice")
        object.__setattr__(self, "candidates", tuple(sorted(cands, reverse=True)))
        if self.granularity not in GRANULARITIES:
            raise UserError(f"--granularity must be layer or channel, not {self.granularity!r}")
        if self.act_groups not in ("tensor", "consumer"):
            raise UserError(f"act_groups must be tensor or consumer, not {self.act_groups!r}")
        if int(self.samples) < 1:
            raise UserError(f"--samples must be >= 1, not {self.samples}")
        if int(self.batch_size) < 1:
            raise UserError(f"--batch-size must be >= 1, not {self.batch_size}")
        if not isinstance(self.extra, dict):
            raise UserError("method options must be a mapping name -> value")

    def key(self, method_params: dict) -> dict:
        """The JSON-able options that determine the scores (the cache key and the table's ``options``)."""
        return {"candidates": list(self.candidates), "granularity": self.granularity, "samples": int(self.samples),
                "batch_size": int(self.batch_size), "seed": int(self.seed), "act_groups": self.act_groups,
                "target": self.target, **{k: _jsonable(v) for k, v in sorted(method_params.items())}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def merge_params(method: str, defaults: dict, extra: dict) -> dict:
    """The method's defaults overridden by ``extra``; unknown names and wrong types are a ``UserError``."""
    unknown = sorted(set(extra) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise UserError(f"method {method} has no option {unknown[0]!r} (its options: {allowed})")
    out = dict(defaults)
    for k, v in extra.items():
        d = defaults[k]
        try:
            if isinstance(d, bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            elif isinstance(d, int):
                v = int(v)
            elif isinstance(d, float):
                v = float(v)
            elif isinstance(d, (list, tuple)) and isinstance(v, str):
                v = [type(d[0])(x) for x in v.split(",") if x] if d else v.split(",")
        except (TypeError, ValueError):
            raise UserError(f"method {method}: option {k}={v!r} is not a {type(d).__name__}") from None
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------------------
# data
def as_dataset(data: Any, split: str) -> TensorDataset:
    """A split of ``data`` (a DataSplits), or ``data`` itself when it is one data set or an (x, y) pair."""
    if isinstance(data, TensorDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if hasattr(data, split):
        return getattr(data, split)
    raise UserError(f"data must be a DataSplits, a TensorDataset or an (inputs, targets) pair, "
                    f"not {type(data).__name__}")


def take(ds: TensorDataset, n: int, extra: TensorDataset | None = None) -> TensorDataset:
    """The first ``n`` samples of ``ds``, topped up from ``extra`` (skipping what ``ds`` already holds)."""
    tensors = [t[:n] for t in ds.tensors]
    have = len(tensors[0])
    if have < n and extra is not None and extra is not ds:
        more = [t[: n - have] for t in extra.tensors]
        tensors = [torch.cat([a, b]) for a, b in zip(tensors, more)]
    return TensorDataset(*tensors)


def data_hash(data: Any) -> str:
    """A content hash of the data (DataSplits have their own fingerprint)."""
    if hasattr(data, "fingerprint"):
        return data.fingerprint()
    h = hashlib.sha256()
    for split in ("calib", "val", "train"):
        try:
            ds = as_dataset(data, split)
        except UserError:
            continue
        for t in ds.tensors:
            t = t.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        if isinstance(data, (TensorDataset, tuple, list)):
            break
    return h.hexdigest()[:16]


def weights_hash(qm: QuantizedModel) -> str:
    """A content hash of the model's own parameters and buffers (the quantizers' state left out)."""
    return state_hash(qm.gm.state_dict())


def state_hash(state: dict) -> str:
    """:func:`weights_hash` of a state dict: a captured graph's, before any quantizer is added."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if name.startswith(("wq.", "aq.")):
            continue
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default per-sample loss: cross-entropy of classification logits."""
    return F.cross_entropy(out, y, reduction="none")


# ------------------------------------------------------------------------------------------------------------
# groups
@dataclass
class ActGroupInfo:
    """One activation quantizer: its key in ``QuantizedModel.aq``, a readable name and its consuming layers."""

    key: str
    name: str
    consumers: list[str]
    quantizer: ActQuantizer


def act_groups(qm: QuantizedModel) -> list[ActGroupInfo]:
    """The activation quantizers of ``qm`` with the layers that read through each, in graph order."""
    names = {}
    for g in qm.graph_ir.act_groups():
        names[_key(g.name)] = g.name
        for c in g.consumers:
            names[_key(f"{g.name}->{c}")] = f"{g.name}->{c}"
    out: dict[str, ActGroupInfo] = {}
    for layer, keys in qm.act_keys.items():
        for k in keys:
            if k not in out:
                out[k] = ActGroupInfo(k, names.get(k, k), [], qm.aq[k])
            if layer not in out[k].consumers:
                out[k].consumers.append(layer)
    return list(out.values())


def weighted_layers(qm: QuantizedModel) -> list[Op]:
    """Layers with a weight quantizer (conv, linear, embedding), in graph order."""
    return [op for op in qm.graph_ir.layers() if qm.weight_quantizer(op.name) is not None]


@torch.no_grad()
def weight_delta(qm: QuantizedModel, layer: str, bits: int) -> torch.Tensor:
    """Q_b(W) − W with the layer's quantizer at ``bits`` (per-channel MSE step sizes); the quantizer is left off."""
    wq = qm.weight_quantizer(layer)
    w = qm.weight(layer)
    wq.set_bits(bits, w)
    try:
        return (wq(w.detach()) - w.detach()).float()
    finally:
        wq.set_bits(None, w)


@torch.no_grad()
def act_scales(groups: list[ActGroupInfo], candidates) -> dict[str, dict[int, torch.Tensor]]:
    """The calibrated step size of every activation quantizer at every candidate bit-width."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for g in groups:
        aq = g.quantizer
        out[g.key] = {}
        for b in candidates:
            aq.set_bits(b)
            out[g.key][b] = aq.scale.detach().abs().clamp_min(1e-12).clone()
        aq.set_bits(None)
    return out


def act_delta(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Q_b(a) − a for recorded activations ``x``."""
    return fake_quant(x.detach(), scale.to(x.device), bits, signed=signed, learn_scale=False) - x.detach()


# ------------------------------------------------------------------------------------------------------------
# taps: values, gradients and perturbations of activation quantizer outputs
class Taps:
    """Forward hooks on activation quantizers that expose what flows through them during one forward pass.

    ``mode="grad"``: ``tensors[key]`` is a tensor on the autograd graph (the gradient w.r.t. it is the gradient
    w.r.t. the quantized activation); ``mode="perturb"``: a zero tensor ``perturb[key]`` that requires grad is
    added to the output (a leaf to differentiate twice). ``values[key]`` is the (detached) input either way.
    """

    def __init__(self, groups: list[ActGroupInfo], mode: str = "grad"):
        self.groups = groups
        self.mode = mode
        self.values: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.perturb: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> Taps:
        for g in self.groups:
            self._handles.append(g.quantizer.register_forward_hook(self._hook(g.key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.values.clear()
        self.tensors.clear()
        self.perturb.clear()

    def _hook(self, key: str):
        def hook(module, inputs, out):
            self.values[key] = inputs[0].detach()
            if self.mode == "perturb":
                d = torch.zeros_like(out, requires_grad=True)
                self.perturb[key] = d
                return out + d
            t = out.view_as(out) if out.requires_grad else out.detach().requires_grad_(True)
            self.tensors[key] = t
            return t
        return hook


class NodeTaps(torch.fx.Interpreter):
    """Run a GraphModule node by node, exposing chosen nodes' outputs (graph tensors) and inputs.

    ``outputs[node]`` is the node's output as a differentiable view; ``args[node]`` its evaluated arguments.
    """

    def __init__(self, gm: torch.fx.GraphModule, nodes: set[str]):
        super().__init__(gm)
        self.names = set(nodes)
        self.outputs: dict[str, torch.Tensor] = {}
        self.args: dict[str, tuple] = {}

    def run_node(self, n: torch.fx.Node):
        if n.name not in self.names:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
        self.args[n.name] = (args, kwargs)
        if isinstance(out, torch.Tensor):
            out = out.view_as(out) if out.requires_grad else out.detach().requires_grad_(True)
        self.outputs[n.name] = out
        return out

    def __call__(self, *inputs):
        self.outputs.clear()
        self.args.clear()
        out = self.run(*inputs)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def layer_node(qm: QuantizedModel, layer: str) -> str:
    """The fx node name of a layer's op in the quantized GraphModule."""
    return qm.graph_ir.ops[layer].attrs["node"]


# ------------------------------------------------------------------------------------------------------------
# context
@dataclass
class Context:
    """What a method works with (see the module docstring)."""

    qmodel: QuantizedModel
    sample: TensorDataset  # calibration split (topped up from train), ``options.samples`` samples
    heldout: TensorDataset  # validation split, ``options.samples`` samples
    train: TensorDataset  # training split, ``options.samples`` samples
    options: SensitivityOptions
    params: dict
    loss_fn: LossFn
    device: torch.device
    progress: ProgressFn | None = None
    target: Any = None  # a loaded target (analog)
    meta: dict = field(default_factory=dict)

    @property
    def graph(self) -> Graph:
        return self.qmodel.graph_ir

    @property
    def candidates(self) -> tuple[int, ...]:
        return self.options.candidates

    def batches(self, ds: TensorDataset | None = None, batch_size: int | None = None, shuffle: bool = False,
                seed: int | None = None, device: torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``ds`` (default: the sample) moved to the device (default: the context's)."""
        ds = self.sample if ds is None else ds
        bs = int(batch_size or self.options.batch_size)
        n = len(ds)
        order = torch.arange(n)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.options.seed if seed is None
                                                                              else seed))
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            yield tuple(t[idx].to(device or self.device) for t in ds.tensors)

    def n_batches(self, ds: TensorDataset | None = None, batch_size: int | None = None) -> int:
        ds = self.sample if ds is None else ds
        return math.ceil(len(ds) / int(batch_size or self.options.batch_size))

    @contextlib.contextmanager
    def stage(self, name: str, total: int):
        """A progress stage of ``total`` steps; the yielded function reports one step done."""
        done = [0]
        if self.progress:
            self.progress(name, 0, total)

        def tick(k: int = 1):
            done[0] += k
            if self.progress:
                self.progress(name, min(done[0], total), total)

        yield tick
        if self.progress and done[0] < total:
            self.progress(name, total, total)

    def fresh_copy(self) -> QuantizedModel:
        """A deep copy of the model for methods that train (LIMPQ, dual)."""
        return copy.deepcopy(self.qmodel)


@dataclass
class RawScores:
    """What a method returns: weight scores per layer, activation scores per quantizer key, energies per layer
    (and per output channel at channel granularity)."""

    w: dict[str, dict[int, float]] = field(default_factory=dict)
    w_channel: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    a: dict[str, dict[int, float]] = field(default_factory=dict)
    e: dict[str, dict[float, float]] = field(default_factory=dict)
    e_channel: dict[str, dict[float, list[float]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def per_channel_sum(t: torch.Tensor) -> list[float]:
    """Sum over everything but the first (output-channel) dimension, as floats."""
    return [float(v) for v in t.detach().reshape(t.shape[0], -1).sum(1).double().cpu()]


__all__ = ["DEFAULT_CANDIDATES", "GRANULARITIES", "ActGroupInfo", "Context", "LossFn", "NodeTaps", "ProgressFn",
           "RawScores", "SensitivityOptions", "Taps", "act_delta", "act_groups", "act_scales", "as_dataset",
           "cross_entropy", "data_hash", "layer_node", "merge_params", "per_channel_sum", "take", "weight_delta",
           "weighted_layers", "weights_hash"]
