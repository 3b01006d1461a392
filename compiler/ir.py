"""The graph IR: typed ops, the tensors between them, and first-class quantization groups.

Every later stage addresses layers by the stable names given here (a weighted layer is named by the module
path that owns its weight, e.g. ``layer1.0.conv1``). The IR is plain data with a JSON round trip, so a
user can inspect it and stages can be run one at a time.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import networkx as nx

IR_VERSION = 1


class OpKind(str, enum.Enum):
    """What an op does, as far as quantization and cost are concerned."""

    CONV = "conv"
    LINEAR = "linear"
    MATMUL = "matmul"  # activation x activation (attention scores, attention x values)
    EMBEDDING = "embedding"
    ADD = "add"
    MUL = "mul"
    CAT = "cat"
    POOL = "pool"
    NORM = "norm"
    ACT = "act"
    RESHAPE = "reshape"
    OTHER = "other"


QUANTIZABLE = frozenset({OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL, OpKind.EMBEDDING})
WEIGHTED = frozenset({OpKind.CONV, OpKind.LINEAR, OpKind.EMBEDDING})


@dataclass
class Op:
    """One node of the IR.

    ``act_inputs`` lists the tensors this op reads that are quantized as activations (the data input of a
    conv/linear, both operands of an attention matmul; none for an embedding lookup). ``macs`` counts one
    forward pass at the captured input shape (batch included, default batch 1).
    """

    name: str
    kind: OpKind
    target: str  # the ATen (or module) op it came from, e.g. "aten.conv2d.default"
    inputs: list[str]  # tensor names read (activations only; weights are listed in weight_fqn)
    output: str  # tensor name written
    in_shapes: list[list[int]]
    out_shape: list[int]
    module: str = ""  # module path that owns the op ("" for the root)
    weight_fqn: str | None = None  # parameter name of the weight, e.g. "layer1.0.conv1.weight"
    weight_shape: list[int] | None = None
    bias_fqn: str | None = None
    groups: int = 1
    fan_in: int = 0
    macs: int = 0
    params: int = 0
    act_inputs: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)

    @property
    def quantizable(self) -> bool:
        return self.kind in QUANTIZABLE

    @property
    def out_channels(self) -> int:
        """Number of weight groups at per-output-channel granularity (rows of the weight)."""
        if self.weight_shape is None:
            return 0
        return self.weight_shape[0]  # conv/linear: output channels; embedding: one row per token

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape) if self.weight_shape else 0

    @property
    def macs_per_out_channel(self) -> float:
        """MACs that one output channel (weight row) performs: the layer's MACs split evenly by rows."""
        return self.macs / self.out_channels if self.out_channels else 0.0


@dataclass
class Tensor:
    """An edge value: produced by one op (or a graph input), read by any number of ops."""

    name: str
    shape: list[int]
    dtype: str
    producer: str | None  # op name, None for a graph input
    consumers: list[str] = field(default_factory=list)
    nonnegative: bool = False  # known >= 0 (after ReLU-like ops): quantized unsigned


@dataclass(frozen=True)
class WeightGroup:
    """The weights of one layer, or of one output channel of it (``channel`` is then its index)."""

    layer: str
    channel: int | None = None

    @property
    def name(self) -> str:
        return self.layer if self.channel is None else f"{self.layer}[{self.channel}]"


@dataclass(frozen=True)
class ActGroup:
    """One activation tensor with one precision, shared by every quantized layer that reads it.

    A residual block input that feeds both ``conv1`` and ``downsample.0`` is one group, so both consumers
    see the same quantized values (as a deployed integer graph would).
    """

    name: str  # the tensor name (the producing op's name, or the graph input's name)
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    signed: bool

    @property
    def numel(self) -> int:
        """Elements per sample (the leading batch dimension excluded)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else math.prod(self.shape)


class Graph:
    """The IR: ops and tensors in topological order, with a networkx view for structure queries."""

    def __init__(self, ops: Iterable[Op], tensors: Iterable[Tensor], inputs: list[str], outputs: list[str],
                 meta: dict | None = None):
        self.ops: dict[str, Op] = {op.name: op for op in ops}
        self.tensors: dict[str, Tensor] = {t.name: t for t in tensors}
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.meta = dict(meta or {})
        self._check()

    # -- structure ---------------------------------------------------------------------------------------
    def _check(self) -> None:
        for op in self.ops.values():
            for t in op.inputs:
                if t not in self.tensors:
                    raise ValueError(f"op {op.name} reads unknown tensor {t}")
            if op.output not in self.tensors:
                raise ValueError(f"op {op.name} writes unknown tensor {op.output}")

    def to_networkx(self) -> nx.DiGraph:
        """Ops as nodes (with their data), one edge per tensor from producer to consumer."""
        g = nx.DiGraph()
        for op in self.ops.values():
            g.add_node(op.name, op=op)
        for t in self.tensors.values():
            if t.producer is None:
                continue
            for c in t.consumers:
                g.add_edge(t.producer, c, tensor=t.name)
        return g

    def layers(self) -> list[Op]:
        """Quantizable ops (conv, linear, matmul, embedding) in topological order."""
        return [op for op in self.ops.values() if op.quantizable]

    def end_layers(self) -> tuple[list[str], list[str]]:
        """The layers no other layer feeds (``first``: every stem reading the input) and the layers that feed no
        other layer (``last``: every head of a two-headed model), in graph order."""
        upstream: set[str] = set()  # tensors some layer's output reaches
        first = []
        for op in self.ops.values():
            fed = any(t in upstream for t in op.inputs)
            if op.quantizable and not fed:
                first.append(op.name)
            if op.quantizable or fed:
                upstream.add(op.output)
        downstream: set[str] = set()  # ops from which a layer is reachable
        last = []
        for op in reversed(list(self.ops.values())):
            feeds = any(c in downstream or self.ops[c].quantizable for c in self.tensors[op.output].consumers
                        if c in self.ops)
            if op.quantizable and not feeds:
                last.append(op.name)
            if feeds:
                downstream.add(op.name)
        return first, last[::-1]

    def weighted_layers(self) -> list[Op]:
        return [op for op in self.ops.values() if op.kind in WEIGHTED and op.weight_shape]

    def layer(self, name: str) -> Op:
        try:
            return self.ops[name]
        except KeyError:
            close = [n for n in self.ops if name in n or n in name][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KeyError(f"no layer named {name!r}{hint}") from None

    def weight_groups(self, granularity: str = "layer") -> list[WeightGroup]:
        """Weight groups: one per weighted layer, or one per output channel with ``granularity="channel"``."""
        if granularity not in ("layer", "channel"):
            raise ValueError(f"granularity must be 'layer' or 'channel', not {granularity!r}")
        out: list[WeightGroup] = []
        for op in self.weighted_layers():
            if granularity == "layer":
                out.append(WeightGroup(op.name))
            else:
                out.extend(WeightGroup(op.name, c) for c in range(op.out_channels))
        return out

    def act_groups(self) -> list[ActGroup]:
        """One group per tensor read as an activation by at least one quantizable op."""
        consumers: dict[str, list[str]] = {}
        for op in self.layers():
            for t in op.act_inputs:
                consumers.setdefault(t, [])
                if op.name not in consumers[t]:
                    consumers[t].append(op.name)
        return [ActGroup(t, tuple(cs), tuple(self.tensors[t].shape), not self.tensors[t].nonnegative)
                for t, cs in consumers.items()]

    def act_group_of(self) -> dict[str, list[str]]:
        """Layer name -> the activation groups (tensor names) it reads."""
        return {op.name: list(op.act_inputs) for op in self.layers()}

    def total_macs(self) -> int:
        """Every MAC the model does: its ops' and those of the parameterised ops that stay float."""
        float_ops = sum(int(u.get("macs", 0)) for u in self.unquantized().values())
        return sum(op.macs for op in self.ops.values()) + float_ops

    def unquantized(self) -> dict[str, dict]:
        """Ops that read parameters, or einsums, that mpqc neither quantizes nor prices (ConvTranspose, LSTM):
        name -> {"op", "params", "macs"}; they run in float."""
        return dict(self.meta.get("unquantized") or {})

    def unquantized_note(self) -> str | None:
        """One line naming the ops of :meth:`unquantized`, for warnings and reports; None when there are none."""
        u = self.unquantized()
        if not u:
            return None
        items = [f"{k} ({v['op']}, {v['params']:,} params" + (f", {v['macs']:,} MACs)" if v.get("macs") else ")")
                 for k, v in list(u.items())[:3]]
        more = f" and {len(u) - 3} more" if len(u) > 3 else ""
        return (f"{len(u)} op(s) stay float and outside every cost and budget: {'; '.join(items)}{more}"
                "; mpqc quantizes conv, linear, matmul and embedding layers")

    def total_params(self) -> int:
        """All parameters of the model (norms and biases included), as recorded at capture."""
        return int(self.meta.get("total_params", sum(op.params for op in self.ops.values())))

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops.values())

    def __len__(self) -> int:
        return len(self.ops)

    # -- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ops = []
        for op in self.ops.values():
            d = asdict(op)
            d["kind"] = op.kind.value
            ops.append(d)
        return {"version": IR_VERSION, "inputs": self.inputs, "outputs": self.outputs, "meta": self.meta,
                "ops": ops, "tensors": [asdict(t) for t in self.tensors.values()]}

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        if d.get("version") != IR_VERSION:
            raise ValueError(f"IR version {d.get('version')!r} is not {IR_VERSION}; re-run capture")
        ops = [Op(**{**o, "kind": OpKind(o["kind"])}) for o in d["ops"]]
        tensors = [Tensor(**t) for t in d["tensors"]]
        return cls(ops, tensors, d["inputs"], d["outputs"], d.get("meta"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Graph:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self.to_dict() == other.to_dict()
