"""The Plan: the precision of every layer (and activation tensor) that the search chose, as a versioned file.

A plan is plain data (``plan.json``): per layer ``w_bits`` (an int, or a list with one entry per output
channel), ``a_bits``, an optional ``emac`` (energy per MAC on an analog target) and ``format``; the shared
precision of each activation tensor; the plan's costs under every model of the target, with the budget, slack
and whether it binds; and the solver's report. Later stages (fine-tune, export, report) read it; a user may edit
it and go on. ``None`` bits mean the operand stays float.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mpqc.errors import UserError

PLAN_VERSION = 1
GRANULARITIES = ("layer", "channel")
ACT_GROUP_MODES = ("tensor", "consumer")


def _is_bits(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 32


@dataclass
class LayerPlan:
    """The precision of one layer: weight bits (per layer or per output channel), input bits, analog E."""

    w_bits: int | list[int] | None
    a_bits: int | None
    emac: float | list[float] | None = None
    format: str = "int"

    def __post_init__(self):
        w = self.w_bits
        if not (w is None or _is_bits(w) or (isinstance(w, list) and w and all(_is_bits(b) for b in w))):
            raise ValueError(f"w_bits must be None, an int 1..32 or a non-empty list of them, not {w!r}")
        if not (self.a_bits is None or _is_bits(self.a_bits)):
            raise ValueError(f"a_bits must be None or an int 1..32, not {self.a_bits!r}")
        e = self.emac
        ok_e = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not (e is None or ok_e(e) or (isinstance(e, list) and e and all(ok_e(v) for v in e))):
            raise ValueError(f"emac must be None, a positive number or a list of them, not {e!r}")
        if not isinstance(self.format, str) or not self.format:
            raise ValueError(f"format must be a non-empty string, not {self.format!r}")

    @property
    def per_channel(self) -> bool:
        return isinstance(self.w_bits, list)


@dataclass
class Plan:
    """A precision plan (see the module docstring); ``to_json``/``from_json`` round-trip it exactly."""

    target: str
    granularity: str = "layer"
    act_groups_mode: str = "tensor"
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    act_groups: dict[str, int | None] = field(default_factory=dict)
    costs: dict[str, dict] = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    objective: float | None = None
    sensitivity: str | None = None
    meta: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self):
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan version {self.version!r} is not {PLAN_VERSION}")
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"target must be a non-empty string, not {self.target!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {self.granularity!r}")
        if self.act_groups_mode not in ACT_GROUP_MODES:
            raise ValueError(f"act_groups_mode must be one of {ACT_GROUP_MODES}, not {self.act_groups_mode!r}")
        for name, lp in list(self.layers.items()):
            if isinstance(lp, dict):
                self.layers[name] = LayerPlan(**lp)
            elif not isinstance(lp, LayerPlan):
                raise ValueError(f"layer {name!r}: expected a LayerPlan, not {type(lp).__name__}")
        for name, b in self.act_groups.items():
            if not (b is None or _is_bits(b)):
                raise ValueError(f"act_groups[{name!r}] must be None or an int 1..32, not {b!r}")

    # -- queries -----------------------------------------------------------------------------------------
    def _layer(self, layer: str) -> LayerPlan:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"the plan has no layer {layer!r}") from None

    def w_bits(self, layer: str) -> int | list[int] | None:
        """Weight bits of ``layer``: an int, a list per output channel, or None (float / no weights)."""
        return self._layer(layer).w_bits

    def a_bits(self, layer: str) -> int | None:
        """Bits of the activations ``layer`` reads (None: float)."""
        return self._layer(layer).a_bits

    def emac(self, layer: str) -> float | list[float] | None:
        return self._layer(layer).emac

    def mean_w_bits(self, layer: str) -> float | None:
        w = self.w_bits(layer)
        return None if w is None else (sum(w) / len(w) if isinstance(w, list) else float(w))

    # -- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise ValueError(f"a plan is a JSON object, not {type(d).__name__}")
        known = {"version", "target", "granularity", "act_groups_mode", "layers", "act_groups", "costs", "solver",
                 "objective", "sensitivity", "meta"}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown key {extra[0]!r}")
        if "version" not in d:
            raise ValueError("missing 'version'")
        if "target" not in d:
            raise ValueError("missing 'target'")
        layers = d.get("layers", {})
        if not isinstance(layers, dict):
            raise ValueError("'layers' must be an object of layer name -> precision")
        parsed = {}
        for name, lp in layers.items():
            if not isinstance(lp, dict):
                raise ValueError(f"layers[{name!r}] must be an object with w_bits and a_bits")
            unknown = sorted(set(lp) - {"w_bits", "a_bits", "emac", "format"})
            if unknown:
                raise ValueError(f"layers[{name!r}]: unknown key {unknown[0]!r}")
            if "w_bits" not in lp or "a_bits" not in lp:
                raise ValueError(f"layers[{name!r}] needs both w_bits and a_bits (null for float)")
            try:
                parsed[name] = LayerPlan(**lp)
            except ValueError as e:
                raise ValueError(f"layers[{name!r}]: {e}") from None
        for key, typ in (("act_groups", dict), ("costs", dict), ("solver", dict), ("meta", dict)):
            if key in d and not isinstance(d[key], typ):
                raise ValueError(f"{key!r} must be a JSON object")
        obj = d.get("objective")
        if obj is not None and not isinstance(obj, (int, float)):
            raise ValueError(f"'objective' must be a number or null, not {obj!r}")
        return cls(version=d["version"], target=d["target"], granularity=d.get("granularity", "layer"),
                   act_groups_mode=d.get("act_groups_mode", "tensor"), layers=parsed,
                   act_groups=dict(d.get("act_groups", {})), costs=dict(d.get("costs", {})),
                   solver=dict(d.get("solver", {})), objective=obj, sensitivity=d.get("sensitivity"),
                   meta=dict(d.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        from mpqc.atomic import atomic_write_text

        atomic_write_text(os.fspath(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan file; a missing, truncated or malformed file is a ``UserError`` naming the problem."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"plan file {path} not found; write one with `mpqc search ... -o {path}`")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 JSON plan file") from None
        if not text.strip():
            raise UserError(f"{path}: the plan file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
                            "truncated or was edited by hand") from None
        if isinstance(data, dict) and data.get("version") not in (None, PLAN_VERSION):
            raise UserError(f"{path}: plan version {data.get('version')!r} is not {PLAN_VERSION}; re-run mpqc search")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: malformed plan: {e}") from None


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as null so every reader accepts the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
def uniform_plan(graph, w_bits: int | None, a_bits: int | None, target_name: str, *,
                 act_groups_mode: str = "tensor") -> Plan:
    """Every quantizable layer at ``w_bits``/``a_bits`` (a matmul's operands both at ``a_bits``; an embedding
    reads no activations)."""
    from mpqc.compiler.ir import OpKind

    layers = {}
    for op in graph.layers():
        if op.kind == OpKind.MATMUL:
            layers[op.name] = LayerPlan(None, a_bits)
        elif op.kind == OpKind.EMBEDDING:
            layers[op.name] = LayerPlan(w_bits, None)
        else:
            layers[op.name] = LayerPlan(w_bits, a_bits)
    acts = {g.name: a_bits for g in graph.act_groups()} if act_groups_mode == "tensor" else {}
    return Plan(target=target_name, granularity="layer", act_groups_mode=act_groups_mode, layers=layers,
                act_groups=acts, meta={"uniform": f"W{w_bits}A{a_bits}"})


def layer_edges(graph) -> list[tuple[str, str, str, int]]:
    """Producer -> consumer edges between quantizable layers: ``(producer, consumer, tensor, elements)``.

    The consumer reads ``tensor`` as an activation; the producers are the quantizable layers reached by
    walking back from it through non-quantizable ops (ReLU, pooling, reshapes, residual adds). ``elements``
    counts the tensor at the captured input shape (what a precision conversion on that edge touches in the
    forward pass whose MACs, latency or energy its cost row adds up: batch included, like theirs)
    """
    quant = {op.name for op in graph.layers()}
    out = []
    for op in graph.layers():
        for t in op.act_inputs:
            seen, stack, producers = set(), [t], []
            while stack:
                name = stack.pop()
                if name in seen:
                    continue
                seen.add(name)
                prod = graph.tensors[name].producer if name in graph.tensors else None
                if prod is None:
                    continue
                if prod in quant:
                    producers.append(prod)
                else:
                    stack.extend(graph.ops[prod].inputs)
            numel = math.prod(graph.tensors[t].shape)  # at the captured shape, like the MACs beside it
            out.extend((p, op.name, t, int(numel)) for p in dict.fromkeys(producers))
    return out


def _extra_models(target, lut) -> list[str]:
    """The per-layer models beyond BitOPs and size that ``target`` prices (latency only with a table)."""
    models = tuple(target.cost_models)
    extra = [m for m in ("cycles", "latency") if m in models]
    if "energy" in models and target.kind == "digital":
        extra.append("energy")
    if "latency" in extra and lut is None:
        extra.remove("latency")
    return extra


def layer_costs(plan: Plan, graph, target, lut=None) -> dict[str, dict[str, float]]:
    """Each planned layer's share of the costs that add up layer by layer: ``bitops``, ``size`` (bytes of weights),
    and where the target prices them ``cycles``, ``energy`` (digital, or analog: MACs x E) and ``latency`` (ms, with
    ``lut``). :func:`plan_costs` sums these; the report plots them."""
    from mpqc.compiler.ir import OpKind
    from mpqc.cost_models import digital

    fb = int(getattr(target, "float_bits", 32))
    extra = _extra_models(target, lut)
    out: dict[str, dict[str, float]] = {}
    for op in graph.layers():
        if op.name not in plan.layers:
            continue
        lp = plan.layers[op.name]
        w = lp.a_bits if op.kind == OpKind.MATMUL else lp.w_bits
        row = {"bitops": float(digital.bitops(op, w, lp.a_bits, float_bits=fb)),
               "size": 0.0 if op.kind == OpKind.MATMUL else digital.weight_bits_total(op, lp.w_bits,
                                                                                      float_bits=fb) / 8}
        if extra:
            costs = digital.layer_costs(op, w, lp.a_bits, _Priced(target, extra), lut=lut,
                                        fmt=None if lp.format == "int" else lp.format)
            row.update({m: float(costs.get(m, 0.0)) for m in extra})
        if lp.emac is not None:
            e = lp.emac  # per channel: each channel does 1/C_out of the MACs
            row["energy"] = float(op.macs * (sum(e) / len(e) if isinstance(e, list) else e))
            row["analog_macs"] = float(op.macs)
        out[op.name] = row
    return out


def plan_costs(plan: Plan, graph, target, lut=None) -> dict[str, dict]:
    """The costs of ``plan`` under every cost model of ``target`` (BitOPs, size and activation memory always).

    Returns ``{name: {"value": v, "unit": u}}``: ``bitops`` (bit-ops per forward pass), ``size`` (bytes of
    weights), ``act_mem`` (bytes, the sum over quantized activation tensors; in consumer mode each consumer's
    copy), ``act_mem_max`` (bytes, the largest one), and where the target prices them ``cycles``, ``energy``
    (target unit), ``latency`` (ms; only with ``lut``), ``emac`` (analog: the MAC-weighted mean E over the analog
    layers) and ``boundary`` (precision conversions; also included in the row it ``applies_to``).
    """
    from mpqc.cost_models.boundary import target_boundary

    fb = int(getattr(target, "float_bits", 32))
    energy_unit = target.analog.unit if target.analog is not None else \
        (target.costs.energy.unit if target.costs.energy is not None else "")
    units = {"bitops": "BOPs", "size": "bytes", "act_mem": "bytes", "act_mem_max": "bytes", "cycles": "cycles",
             "energy": energy_unit, "latency": "ms", "emac": f"{energy_unit}/MAC", "boundary": ""}
    extra = _extra_models(target, lut)
    per_layer = layer_costs(plan, graph, target, lut)
    totals = {m: sum(row.get(m, 0.0) for row in per_layer.values()) for m in ("bitops", "size", *extra)}
    analog_e = sum(row["energy"] for row in per_layer.values() if "analog_macs" in row)
    analog_macs = sum(row.get("analog_macs", 0.0) for row in per_layer.values())
    # activation memory: per tensor (shared) or per consumer
    sizes = []
    if plan.act_groups_mode == "tensor":
        for g in graph.act_groups():
            bits = plan.act_groups.get(g.name)
            if g.name not in plan.act_groups:
                cons = [plan.layers[c].a_bits for c in g.consumers if c in plan.layers]
                if not cons:
                    continue
                bits = None if any(b is None for b in cons) else max(cons)
            sizes.append(g.numel * (fb if bits is None else bits))
    else:
        for op in graph.layers():
            if op.name not in plan.layers:
                continue
            b = plan.layers[op.name].a_bits
            for t in op.act_inputs:
                shape = graph.tensors[t].shape
                numel = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
                sizes.append(numel * (fb if b is None else b))
    out = {"bitops": totals["bitops"], "size": totals["size"], "act_mem": float(sum(sizes)) / 8,
           "act_mem_max": float(max(sizes, default=0.0)) / 8}
    for m in extra:
        out[m] = totals[m]
    if target.kind == "analog":
        out["energy"] = analog_e
        out["emac"] = analog_e / analog_macs if analog_macs else 0.0
    priced = target_boundary(target)
    if priced is not None:
        per_element, row = priced
        b = 0.0
        for u, v, _t, numel in layer_edges(graph):
            if u in plan.layers and v in plan.layers and plan.layers[u].a_bits != plan.layers[v].a_bits:
                b += per_element * numel
        out["boundary"] = b
        units["boundary"] = units.get(row, "")
        if row in out:
            out[row] += b
    return {k: {"value": float(v), "unit": units[k]} for k, v in out.items()}


class _Priced:
    """A view of a target that prices only some of its models (for ``layer_costs``)."""

    def __init__(self, target, models):
        self._t, self.cost_models = target, tuple(models)

    def __getattr__(self, name):
        return getattr(self._t, name)


# base cost row each budget row is a multiple of (the same model of the target, in the option's unit)
_BUDGET_BASE = {"bitops": "bitops", "avg-bits": "bitops", "size": "size", "compression": "size",
                "act-mem": "act_mem", "act-mem-max": "act_mem_max", "latency": "latency", "energy": "energy",
                "emac": "emac", "cycles": "cycles"}


def plan_after_finetune(plan: Plan, q, result, method: str, graph=None, target=None, lut=None) -> Plan:
    """A copy of ``plan`` with what fine-tuning learned: the widths (dxmax) or energies per MAC (energy) of the
    QuantizedModel ``q`` after ``finetune`` returned ``result``. With ``graph`` and ``target`` the costs are those
    of the learned precisions (each budget row scaled with the cost it limits, its slack and binding flag
    recomputed); without them they are dropped (``mpqc report`` recomputes them)."""
    from mpqc.compiler.quantize import bits_of

    new = Plan.from_dict(plan.to_dict())
    if result.emac:
        for layer, e in result.emac.items():
            if layer in new.layers:
                new.layers[layer].emac = e
    if result.bits:
        for op in q.graph_ir.layers():
            lp = new.layers.get(op.name)
            if lp is None:
                continue
            wq = q.weight_quantizer(op.name)
            if wq is not None and wq.enabled:
                lp.w_bits = bits_of(wq)
            aqs = [a for a in q.act_quantizers(op.name) if a.enabled]
            if aqs:
                lp.a_bits = max(a.bits for a in aqs)
            for t, key in zip(op.act_inputs, q.act_keys.get(op.name, [])):
                if t in new.act_groups and q.aq[key].enabled:
                    new.act_groups[t] = q.aq[key].bits
    new.meta = {**new.meta, "finetuned": method}
    if graph is None or target is None:
        new.costs = {}
        return new
    now = plan_costs(new, graph, target, lut=lut)
    costs = {}
    for name, row in plan.costs.items():
        row = dict(row)
        base = name[len("budget:"):] if name.startswith("budget:") else None
        if base is None:
            if name in now:
                row.update(value=now[name]["value"])
        else:
            key = _BUDGET_BASE.get(base)
            old = plan.costs.get(key, {}).get("value") if key else None
            if key in now and old and row.get("value") is not None:
                row["value"] = row["value"] * now[key]["value"] / old
                if row.get("budget") is not None:
                    row["slack"] = row["budget"] - row["value"]
                    row["binding"] = bool(row["slack"] <= 1e-4 * max(abs(row["budget"]), 1.0))
            else:
                row["stale"] = True  # not re-evaluated for the learned precisions
        costs[name] = row
    for name, c in now.items():
        costs.setdefault(name, {"value": c["value"], "unit": c["unit"], "budget": None, "slack": None,
                                "binding": False})
    new.costs = costs
    return new

