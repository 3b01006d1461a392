"""Fake-quantized models: quantizers inserted into the captured GraphModule at the IR's groups.

One ``QuantizedModel`` serves every stage that needs the network at some precision: sensitivity (one group
at b bits, the rest in float), fine-tuning (the plan's precision, learned step sizes) and export (the
integer codes and scales). Quantizers with ``bits=None`` pass values through, so precisions change in
place without re-tracing.

Numerics (DESIGN.md conventions): weights symmetric signed, one scale per output channel (axis 0), bits per
layer or per channel; activations one scale per tensor, unsigned where the IR knows the tensor is
non-negative, signed otherwise; round half to even.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.fx
from torch import nn

from mpqc.kernels import fake_quant

from .capture import Captured
from .ir import Graph, OpKind
from .passes import packet


class RangeMethod(str, enum.Enum):
    """How a quantizer's range is set from data before (or instead of) learning it."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


@dataclass(frozen=True)
class LayerQuant:
    """The precision of one layer: weight bits (int, per-channel list, or None = float) and input bits."""

    w_bits: int | tuple[int, ...] | None = None
    a_bits: int | None = None


def _qmax(bits: torch.Tensor | int, signed: bool):
    return (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)


def _mse_scale(x: torch.Tensor, absmax: torch.Tensor, bits: torch.Tensor, signed: bool, axis: int | None,
               grid: int = 40) -> torch.Tensor:
    """The scale among clipping ratios 0.3..1 of ``absmax`` that minimises the quantization MSE (per channel)."""
    qmax = torch.as_tensor(_qmax(bits, signed), dtype=torch.float32)
    best_err = None
    best = absmax / qmax
    for r in torch.linspace(0.3, 1.0, grid):
        s = (absmax * r / qmax).clamp_min(1e-12)
        y = fake_quant(x, s, bits, axis=axis, signed=signed, backend="torch", learn_scale=False)
        dims = [d for d in range(x.dim()) if d != (axis % x.dim() if axis is not None else -1)]
        err = ((y - x) ** 2).mean(dim=dims) if axis is not None else ((y - x) ** 2).mean()
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel fake-quant of a weight; the step size is a learnable parameter (LSQ)."""

    def __init__(self, weight: torch.Tensor, bits=None, method: RangeMethod = RangeMethod.MSE):
        super().__init__()
        c = weight.shape[0]
        self.method = RangeMethod(method)
        self.scale = nn.Parameter(torch.ones(c, dtype=torch.float32))
        self.register_buffer("bits", torch.full((c,), 8, dtype=torch.int32))
        self.enabled = False
        self._cache: dict = {}  # (bits, weight version) -> step sizes: sensitivity passes revisit bit-widths
        self.set_bits(bits, weight)

    def set_bits(self, bits, weight: torch.Tensor) -> None:
        """Change the precision (None disables) and re-initialise the step size from the weight."""
        if bits is None:
            self.enabled = False
            return
        c = weight.shape[0]
        b = torch.as_tensor(bits, dtype=torch.int32).reshape(-1)
        if b.numel() not in (1, c):
            raise ValueError(f"{b.numel()} per-channel bit-widths for a weight with {c} output channels")
        self.bits.copy_(b.expand(c))
        self.enabled = True
        key = (tuple(b.tolist()), weight.data_ptr(), weight._version)
        if key in self._cache:
            with torch.no_grad():
                self.scale.copy_(self._cache[key])
            return
        with torch.no_grad():
            w = weight.detach().float()
            absmax = w.abs().reshape(c, -1).amax(dim=1).clamp_min(1e-8)
            if self.method == RangeMethod.MSE:
                s = _mse_scale(w, absmax, self.bits, True, 0)
            else:
                s = absmax / _qmax(self.bits, True).float()
            self.scale.copy_(s.clamp_min(1e-12))
            self._cache[key] = self.scale.detach().clone()

    @property
    def uniform_bits(self) -> int | None:
        """The one bit-width of every channel, or None; cached on the host (reading a CUDA buffer syncs, and
        every forward asks) until the buffer changes (``set_bits``, ``load_state_dict``)."""
        if self.bits.device.type == "meta":  # shapes only (tests of what a step copies): the per-channel path
            return None
        key = (self.bits.data_ptr(), self.bits._version)
        cached = self.__dict__.get("_uniform")
        if cached is None or cached[0] != key:
            b = self.bits.unique()
            cached = (key, int(b[0]) if b.numel() == 1 else None)
            self.__dict__["_uniform"] = cached
        return cached[1]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        bits = self.uniform_bits or self.bits
        return fake_quant(w, self.scale.abs().clamp_min(1e-12), bits, axis=0, signed=True)


class ActQuantizer(nn.Module):
    """Per-tensor fake-quant of an activation; observes a sample of values so the range can be set for any bits."""

    SAMPLE = 1 << 16  # values kept per tensor for percentile/MSE ranges

    def __init__(self, signed: bool, bits: int | None = None, method: RangeMethod = RangeMethod.MSE):
        super().__init__()
        self.signed = bool(signed)
        self.method = RangeMethod(method)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))
        self.bits = bits
        self.observing = False
        self.register_buffer("absmax", torch.zeros(()))
        self.register_buffer("sample", torch.zeros(0))

    @property
    def enabled(self) -> bool:
        return self.bits is not None and not self.observing

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.absmax = torch.maximum(self.absmax, x.abs().max() if x.numel() else self.absmax)
        k = min(x.numel(), self.SAMPLE)
        idx = torch.randint(0, x.numel(), (k,), generator=torch.Generator().manual_seed(x.numel()))
        merged = torch.cat([self.sample, x.cpu()[idx]])
        if merged.numel() > self.SAMPLE:
            merged = merged[torch.randperm(merged.numel(), generator=torch.Generator().manual_seed(7))[:self.SAMPLE]]
        self.sample = merged

    def init_scale(self, method: RangeMethod | None = None, percentile: float = 99.99) -> None:
        """Set the step size for the current bits from the observed values."""
        if self.bits is None:
            return
        method = RangeMethod(method or self.method)
        qmax = _qmax(self.bits, self.signed)
        absmax = self.absmax.clamp_min(1e-8)
        with torch.no_grad():
            if method == RangeMethod.MINMAX or self.sample.numel() == 0:
                s = absmax / qmax
            elif method == RangeMethod.PERCENTILE:
                s = torch.quantile(self.sample.abs(), percentile / 100).clamp_min(1e-8) / qmax
            else:
                s = _mse_scale(self.sample, absmax, self.bits, self.signed, None)
            self.scale.copy_(s.clamp_min(1e-12))

    def set_bits(self, bits: int | None) -> None:
        self.bits = bits
        self.init_scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if self.bits is None:
            return x
        return fake_quant(x, self.scale.abs().clamp_min(1e-12), self.bits, signed=self.signed)


def _key(name: str) -> str:
    return name.replace(".", "_").replace("/", "__").replace("@", "_at_").replace("[", "_").replace("]", "_")


class QuantizedModel(nn.Module):
    """The captured GraphModule with a weight quantizer per weighted layer and activation quantizers per group.

    ``act_groups="tensor"`` gives one activation quantizer per tensor, shared by all quantized consumers;
    ``"consumer"`` gives one per (tensor, consuming layer) edge.
    """

    def __init__(self, captured: Captured, *, act_groups: str = "tensor", method: RangeMethod = RangeMethod.MSE):
        super().__init__()
        if act_groups not in ("tensor", "consumer"):
            raise ValueError(f"act_groups must be 'tensor' or 'consumer', not {act_groups!r}")
        self.graph_ir: Graph = captured.graph
        self.act_groups_mode = act_groups
        gm = captured.gm
        self.gm = gm
        self.wq = nn.ModuleDict()
        self.aq = nn.ModuleDict()
        self.rq = nn.ModuleDict()  # on residual-add inputs (compiler/residual.py); empty until placed
        self.act_keys: dict[str, list[str]] = {}  # layer -> activation quantizer keys it reads through
        self._insert(method)

    # -- construction ------------------------------------------------------------------------------------
    def _insert(self, method: RangeMethod) -> None:
        gm, ir = self.gm, self.graph_ir
        nodes = {n.name: n for n in gm.graph.nodes}
        tensor_node: dict[str, torch.fx.Node] = {}
        for op in ir.ops.values():
            tensor_node[op.output] = nodes[op.attrs["node"]]
        for n in gm.graph.nodes:
            if n.op == "placeholder" and str(n.target) in ir.tensors:
                tensor_node[str(n.target)] = n
        shared: dict[str, torch.fx.Node] = {}
        # the quantizers live on this module; the GraphModule reaches them through the same objects
        gm.add_submodule("wq", self.wq)
        gm.add_submodule("aq", self.aq)
        gm.add_submodule("rq", self.rq)
        for op in ir.layers():
            node = nodes[op.attrs["node"]]
            if op.kind in (OpKind.CONV, OpKind.LINEAR, OpKind.EMBEDDING) and op.weight_fqn:
                w_node, reader = _weight_read(node, op.weight_fqn)
                key = _key(op.name)
                self.wq[key] = WeightQuantizer(self._param(op.weight_fqn), None, method)
                with gm.graph.inserting_after(w_node):
                    q = gm.graph.call_module(f"wq.{key}", (w_node,))
                reader.replace_input_with(w_node, q)  # the op itself, or the first view between it and the weight
            keys = []
            for t in op.act_inputs:
                src = tensor_node[t]
                key = _key(t) if self.act_groups_mode == "tensor" else _key(f"{t}->{op.name}")
                if key not in self.aq:
                    self.aq[key] = ActQuantizer(signed=not ir.tensors[t].nonnegative, method=method)
                if self.act_groups_mode == "tensor" and key in shared:
                    q = shared[key]
                else:
                    with gm.graph.inserting_after(src):
                        q = gm.graph.call_module(f"aq.{key}", (src,))
                    shared[key] = q
                node.replace_input_with(src, q)
                keys.append(key)
            self.act_keys[op.name] = keys
        gm.graph.lint()
        gm.recompile()

    def _param(self, fqn: str) -> torch.Tensor:
        obj = self.gm
        for part in fqn.split("."):
            obj = getattr(obj, part)
        return obj

    # -- precision ---------------------------------------------------------------------------------------
    def weight(self, layer: str) -> torch.Tensor:
        return self._param(self.graph_ir.ops[layer].weight_fqn)

    def weight_quantizer(self, layer: str) -> WeightQuantizer | None:
        return self.wq[_key(layer)] if _key(layer) in self.wq else None

    def act_quantizers(self, layer: str) -> list[ActQuantizer]:
        return [self.aq[k] for k in self.act_keys.get(layer, [])]

    def act_quantizers_all(self) -> list[ActQuantizer]:
        """Every activation quantizer: the layers' inputs, then the residual-add inputs."""
        return list(self.aq.values()) + list(self.rq.values())

    def set_precision(self, layer: str, *, w_bits=..., a_bits=...) -> None:
        """Set one layer's weight and/or input precision (``None`` = float; omitted = unchanged)."""
        if layer not in self.act_keys:
            raise KeyError(f"{layer!r} is not a quantizable layer")
        if w_bits is not ...:
            wq = self.weight_quantizer(layer)
            if wq is not None:
                wq.set_bits(w_bits, self.weight(layer))
        if a_bits is not ...:
            for aq in self.act_quantizers(layer):
                aq.set_bits(a_bits)

    def apply(self, assignment: dict[str, LayerQuant]) -> None:
        """Set every layer's precision; layers missing from ``assignment`` are left in float."""
        unknown = set(assignment) - set(self.act_keys)
        if unknown:
            raise KeyError(f"the plan names layers the model does not have: {sorted(unknown)[:5]}")
        for layer in self.act_keys:
            lq = assignment.get(layer, LayerQuant())
            self.set_precision(layer, w_bits=lq.w_bits, a_bits=lq.a_bits)

    def apply_plan(self, plan) -> None:
        """Set every layer from a Plan (per-layer bits, then its shared activation groups in tensor mode) or
        from a ``{layer: LayerQuant}`` map; the one place plans become quantizer settings."""
        if isinstance(plan, Mapping):
            self.apply(dict(plan))
            return
        self.apply({name: LayerQuant(tuple(lp.w_bits) if isinstance(lp.w_bits, list) else lp.w_bits, lp.a_bits)
                    for name, lp in plan.layers.items()})
        groups = getattr(plan, "act_groups", None) or {}
        if groups and self.act_groups_mode == "tensor":
            for op in self.graph_ir.layers():
                for t, key in zip(op.act_inputs, self.act_keys.get(op.name, [])):
                    if t in groups:
                        self.aq[key].set_bits(groups[t])

    def disable(self) -> None:
        """Everything in float (the quantizers keep their observed statistics)."""
        for layer in self.act_keys:
            self.set_precision(layer, w_bits=None, a_bits=None)

    @torch.no_grad()
    def calibrate(self, batches: Iterable, *, method: RangeMethod | None = None, max_batches: int = 8) -> None:
        """Observe activations on float data, then set every enabled activation quantizer's step size."""
        for aq in self.act_quantizers_all():
            aq.observing = True
            aq.absmax.zero_()
            aq.sample = torch.zeros(0)
        wstate = {k: q.enabled for k, q in self.wq.items()}
        for q in self.wq.values():
            q.enabled = False
        was_training = self.training
        self.eval()
        try:
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                self.gm(x)
        finally:
            for aq in self.act_quantizers_all():
                aq.observing = False
                aq.init_scale(method)
            for k, q in self.wq.items():
                q.enabled = wstate[k]
            self.train(was_training)

    def train(self, mode: bool = True) -> QuantizedModel:
        """Switch the quantizers (and modules that ask to follow, ``follows_train_mode``) only: the captured graph
        is an inference graph (BN statistics frozen)."""
        self.training = mode
        for m in list(self.wq.modules()) + list(self.aq.modules()) + list(self.rq.modules()):
            m.training = mode
        for m in self.gm.modules():
            if getattr(m, "follows_train_mode", False):
                m.training = mode
        return self

    def forward(self, *args):
        return self.gm(*args)

    def quant_parameters(self) -> list[nn.Parameter]:
        return [q.scale for q in list(self.wq.values()) + self.act_quantizers_all()]

    def model_parameters(self) -> list[nn.Parameter]:
        qs = {id(p) for p in self.quant_parameters()}
        return [p for p in self.gm.parameters() if id(p) not in qs]


def _int32_codes(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    lim = float(2 ** 31 - 1)
    return torch.clamp(torch.round(b.detach().float() / scale), -lim, lim).to(torch.int32)


def _to_grid(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_int32_codes(b, scale).float() * scale).to(b.dtype)


class _RoundToGrid(torch.autograd.Function):
    """round(b / s) · s (clamped to int32 codes) forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _to_grid(b, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class BiasQuantizer(nn.Module):
    """A conv or linear bias on the accumulator grid: int32 codes at scale s_in · s_w[c], as integer kernels add it.

    onnxruntime quantizes a float bias this way when it fuses QLinearConv or a Gemm (``WeightBiasQuantization``); the
    export does it in its deploy graph so fused and unfused runs agree, and fine-tuning does it in its last
    steps (straight-through) so the weights learn the grid: with 2-bit inputs and weights the grid is a sizeable
    part of the next quantizer's step (bench/RESULTS.md: 0.6 point of top-1 at W2A2 when left unseen).
    """

    def __init__(self, act: ActQuantizer, weight: WeightQuantizer):
        super().__init__()
        self._refs = (act, weight)  # a tuple: not registered as submodules, so module names stay unique

    def scale(self) -> torch.Tensor:
        """s_in · s_w[c] in fp32 (the DequantizeLinear scale)."""
        act, weight = self._refs
        return act.scale.detach().abs().clamp_min(1e-12) * weight.scale.detach().abs().clamp_min(1e-12)

    def codes(self, b: torch.Tensor) -> torch.Tensor:
        """int32 codes of the bias ``b``."""
        return _int32_codes(b, self.scale())

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return _RoundToGrid.apply(b, self.scale())

    @torch.no_grad()
    def error(self, b: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """round(b; gain · s_in · s_w) − b: what the grid does to ``b`` once the conv's weight rows (and step
        sizes) are scaled by the positive per-channel ``gain``, as folding a normalisation does."""
        return _to_grid(b, self.scale() * gain.detach().float()) - b.detach()


CONV_TARGETS = frozenset({"conv1d", "conv2d", "conv3d", "convolution"})
LINEAR_TARGETS = frozenset({"linear"})  # (x, w, b) like a conv; addmm's bias comes first and is not matched
INTEGER_BIAS_TARGETS = CONV_TARGETS | LINEAR_TARGETS  # ops whose fused integer kernel adds an int32 bias


def bias_sites(gm: torch.fx.GraphModule, act_prefixes=("aq.",), ops=INTEGER_BIAS_TARGETS):
    """``(node, bias node, key, act quantizer, weight quantizer)`` of every conv or linear (the ops of ``ops``)
    whose input (through a quantizer module named ``<act_prefix>...``) and weight (``wq.<key>``) are quantized by
    enabled Act/WeightQuantizers and whose bias is a parameter: the biases an integer kernel adds on the s_in·s_w
    grid."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or packet(n) not in ops:
            continue
        args = list(n.args)
        if len(args) < 3 or not isinstance(args[2], torch.fx.Node) or args[2].op != "get_attr":
            continue
        x, w = args[0], args[1]
        if not all(isinstance(v, torch.fx.Node) and v.op == "call_module" for v in (x, w)):
            continue
        if not (str(x.target).startswith(tuple(act_prefixes)) and str(w.target).startswith("wq.")):
            continue
        act, weight = gm.get_submodule(str(x.target)), gm.get_submodule(str(w.target))
        if not (isinstance(act, ActQuantizer) and isinstance(weight, WeightQuantizer)):
            continue  # fp8 layers keep a float bias
        if act.enabled and weight.enabled:
            out.append((n, args[2], str(w.target)[3:], act, weight))
    return out


def _weight_read(node: torch.fx.Node, fqn: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The get_attr of parameter ``fqn`` that ``node`` reads, directly or through a chain of single-input views
    (``x @ W.t()``; a decomposed linear's permute -> expand -> view -> bmm), and the node that reads it."""
    stack = [(a, node) for a in node.all_input_nodes]
    while stack:
        a, reader = stack.pop()
        if a.op == "get_attr" and str(a.target) == fqn:
            return a, reader
        if a.op in ("call_function", "call_method") and a.args and isinstance(a.args[0], torch.fx.Node):
            stack.append((a.args[0], a))
    raise ValueError(f"{node.name} does not read parameter {fqn}")


def bits_of(wq: WeightQuantizer) -> int | list[int]:
    u = wq.uniform_bits
    return u if u is not None else [int(b) for b in wq.bits]


def weight_codes(wq: WeightQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and per-channel scales of a quantized weight (what an exporter stores)."""
    s = wq.scale.detach().abs().clamp_min(1e-12)
    shape = (-1,) + (1,) * (w.dim() - 1)
    qmax = _qmax(wq.bits.to(torch.int64), True).reshape(shape)
    codes = torch.clamp(torch.round(w.detach().float() / s.reshape(shape)), -qmax - 1, qmax)
    return codes.to(torch.int8), s


__all__ = ["ActQuantizer", "BiasQuantizer", "LayerQuant", "QuantizedModel", "RangeMethod", "WeightQuantizer", "bits_of",
           "bias_sites", "weight_codes", "CONV_TARGETS", "INTEGER_BIAS_TARGETS",
           "LINEAR_TARGETS"]
