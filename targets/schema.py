"""Target descriptions as frozen dataclasses: what a deployment target runs and how it prices a plan.

A target is data (a TOML file, read by ``targets.loader``). Every key is checked; an unknown key, a wrong
type or a value out of range is one ``UserError`` line ``"{file}: {key}: {problem}; {fix}"``. The schema::

    name = "bitserial"                  # required; letters, digits, '-', '_'
    description = "..."                 # optional
    kind = "digital"                    # "digital" | "analog"
    float_bits = 32                     # bits an unquantized operand counts as in BitOPs/size/act_mem:
                                        # 32 where floats run as fp32, 16 where they run as bf16/fp16
    [weights]
    bits = [2, 4, 8]                    # integer widths 2..8; 16 = bf16/fp16 passthrough (needs that format)
    formats = ["int"]                   # int | fp8 (needs 8 in bits) | bf16 | fp16 (need 16 in bits)
    granularity = ["layer", "channel"]  # units of bit allocation: a whole layer, one output channel
    symmetric = true
    [activations]                       # bits, formats, symmetric (true: zero-point 0, signed only)
    [[rules]]                           # capability filter; an op kind with no rule takes every pair
    ops = ["linear"]                    # conv | linear | matmul | embedding (each kind in one rule at most)
    pairs = [[8, 8]]                    # allowed (w, a); default: weight_bits x act_bits
    weight_bits = [8]                   # restrict the default product (ignored when pairs is given)
    act_bits = [8]
    weight_only_bits = [4]              # (w, None): weights quantized, activations stay float (not for
                                        # matmul; for embedding the default is every weight width)
    formats = ["int", "fp8"]            # restrict the formats of these ops
    float = true                        # (None, None): the op may stay unquantized
    [fixed]                             # "first" | "last" | a layer name = bits (w = a), or {w = 8, a = 8};
                                        # analog targets may also fix the energy per MAC: {e = 100.0}
    [costs]
    models = ["bitops", "size"]         # the cost models that price a plan on this target (at least one)
    [costs.cycles]    slice_bits = 2, macs_per_cycle = 1.0
    [costs.energy]    c0, c_w, c_a, c_wa (>= 0), unit: e_mac = c0 + c_w·b_w + c_a·b_a + c_wa·b_w·b_a
    [costs.boundary]  per_element (>= 0), applies_to = "latency" | "energy" | "cycles"
    [costs.latency]   runtime = "onnxruntime-cpu" | "torch-cuda" | "tensorrt"  (the profiler that fills it)
    [analog]                            # kind = "analog" only
    e_grid = {min = 1.0, max = 10000.0, points = 25}   # geometric grid of energy per MAC
    noise = "thermal"                   # thermal | shot | weight (Garg et al., research/seeds.md §2.2)
    dac_bits = 8                        # >= every activation width (the DAC feeds the activations)
    adc_bits = 8                        # output quantization, adds (R_out/(2^adc-1))^2/12 of noise variance
    digital_layers = ["first", "last"]  # layers that may stay digital
    sigma_t = 0.01                      # thermal noise constant;  weight_noise = 0.1: sigma_w = 0.1·R_w/sqrt(E)
    unit = "a.u."                       # the unit of E (and so of analog energy)

Candidates are ``(w_bits, a_bits)`` with ``None`` meaning float: ``(4, None)`` is int4 weight-only, ``(None,
None)`` leaves the op unquantized. For an activation x activation matmul the ``w`` slot is the second operand.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from mpqc.cost_models.protocols import OP_KINDS, QUANTIZABLE_KINDS, kind_name

SCHEMA_VERSION = 1
INT_BITS = range(2, 9)
FORMATS = ("int", "fp8", "bf16", "fp16")
HALF_FORMATS = ("bf16", "fp16")
GRANULARITIES = ("layer", "channel")
DIGITAL_MODELS = ("bitops", "size", "act_mem", "cycles", "energy", "latency", "boundary")
ANALOG_MODELS = ("bitops", "size", "act_mem", "energy", "emac")
RUNTIMES = ("onnxruntime-cpu", "torch-cuda", "tensorrt")
NOISE_TYPES = ("thermal", "shot", "weight")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class SchemaError(ValueError):
    """One problem in a target description: the key, what is wrong, and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        super().__init__(f"{key}: {problem}; {fix}")
        self.key, self.problem, self.fix = key, problem, fix

    def under(self, prefix: str) -> SchemaError:
        """The same problem with its key placed under a parent table, e.g. ``bits`` -> ``weights.bits``."""
        return SchemaError(f"{prefix}.{self.key}" if self.key else prefix, self.problem, self.fix)


def _unique(values, key: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise SchemaError(key, f"duplicate value {v!r}", "list each value once")
        seen.add(v)


def _nonneg(value: float, key: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise SchemaError(key, f"{value!r} is negative or not finite", "use a finite number >= 0")


@dataclass(frozen=True)
class OperandSpec:
    """What one operand (the weights, or the activations) may be quantized to."""

    bits: tuple[int, ...]
    formats: tuple[str, ...] = ("int",)
    symmetric: bool = True
    granularity: tuple[str, ...] = ("layer",)

    def __post_init__(self):
        if not self.bits:
            raise SchemaError("bits", "is empty", "list at least one bit-width, e.g. [4, 8]")
        _unique(self.bits, "bits")
        for b in self.bits:
            if b not in INT_BITS and b != 16:
                raise SchemaError("bits", f"{b} is out of range", "use integer widths 2..8, or 16 for bf16/fp16")
        if not self.formats:
            raise SchemaError("formats", "is empty", f"list at least one of {', '.join(FORMATS)}")
        _unique(self.formats, "formats")
        for f in self.formats:
            if f not in FORMATS:
                raise SchemaError("formats", f"unknown format {f!r}", f"use one of {', '.join(FORMATS)}")
        if 16 in self.bits and not set(HALF_FORMATS) & set(self.formats):
            raise SchemaError("bits", "16 needs a 16-bit float format", "add 'bf16' or 'fp16' to formats")
        if "fp8" in self.formats and 8 not in self.bits:
            raise SchemaError("formats", "fp8 needs 8 in bits", "add 8 to bits or drop fp8")
        if set(HALF_FORMATS) & set(self.formats) and 16 not in self.bits:
            raise SchemaError("formats", "bf16/fp16 need 16 in bits", "add 16 to bits or drop the format")
        if not self.granularity:
            raise SchemaError("granularity", "is empty", "use ['layer'] or ['layer', 'channel']")
        _unique(self.granularity, "granularity")
        for g in self.granularity:
            if g not in GRANULARITIES:
                raise SchemaError("granularity", f"unknown granularity {g!r}", "use 'layer' or 'channel'")


@dataclass(frozen=True)
class Rule:
    """Which candidates the op kinds in ``ops`` may take (see the module docstring)."""

    ops: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...] | None = None
    weight_bits: tuple[int, ...] | None = None
    act_bits: tuple[int, ...] | None = None
    weight_only_bits: tuple[int, ...] | None = None
    formats: tuple[str, ...] | None = None
    float: bool = False

    def __post_init__(self):
        if not self.ops:
            raise SchemaError("ops", "is empty", f"list op kinds from {', '.join(QUANTIZABLE_KINDS)}")
        _unique(self.ops, "ops")
        for op in self.ops:
            if op not in QUANTIZABLE_KINDS:
                raise SchemaError("ops", f"unknown op type {op!r}", f"use one of {', '.join(QUANTIZABLE_KINDS)}")
        if "embedding" in self.ops and (self.pairs or self.act_bits):
            raise SchemaError("pairs", "embedding layers read no quantized activations",
                              "give embeddings their own rule with weight_only_bits")
        for name in ("pairs", "weight_bits", "act_bits", "weight_only_bits", "formats"):
            v = getattr(self, name)
            if v:
                _unique(v, name)
        for f in self.formats or ():
            if f not in FORMATS:
                raise SchemaError("formats", f"unknown format {f!r}", f"use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class EnergySpec:
    """Digital energy per MAC: ``c0 + c_w·b_w + c_a·b_a + c_wa·b_w·b_a`` in ``unit`` (pJ by default)."""

    c0: float = 0.0
    c_w: float = 0.0
    c_a: float = 0.0
    c_wa: float = 0.0
    unit: str = "pJ"

    def __post_init__(self):
        for k in ("c0", "c_w", "c_a", "c_wa"):
            _nonneg(getattr(self, k), k)
        if self.c0 == self.c_w == self.c_a == self.c_wa == 0:
            raise SchemaError("", "all coefficients are 0", "set c0, c_w, c_a or c_wa")

    def per_mac(self, w_bits: float, a_bits: float) -> float:
        return self.c0 + self.c_w * w_bits + self.c_a * a_bits + self.c_wa * w_bits * a_bits


@dataclass(frozen=True)
class CyclesSpec:
    """Bit-serial compute: cycles = MACs·ceil(b_w/slice_bits)·ceil(b_a/slice_bits)/macs_per_cycle."""

    slice_bits: int = 2
    macs_per_cycle: float = 1.0

    def __post_init__(self):
        if self.slice_bits not in range(1, 9):
            raise SchemaError("slice_bits", f"{self.slice_bits} is out of range", "use 1..8")
        if not (math.isfinite(self.macs_per_cycle) and self.macs_per_cycle > 0):
            raise SchemaError("macs_per_cycle", f"{self.macs_per_cycle!r} is not positive", "use a number > 0")


@dataclass(frozen=True)
class BoundarySpec:
    """Cost of converting one activation element between two precisions, added to the ``applies_to`` row."""

    per_element: float = 0.0
    applies_to: str = "latency"

    def __post_init__(self):
        _nonneg(self.per_element, "per_element")
        if self.applies_to not in ("latency", "energy", "cycles"):
            raise SchemaError("applies_to", f"unknown cost row {self.applies_to!r}", "use latency, energy or cycles")


@dataclass(frozen=True)
class LatencySpec:
    """Which profiler measures this target's latency table (``mpqc profile``)."""

    runtime: str

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise SchemaError("runtime", f"unknown runtime {self.runtime!r}", f"use one of {', '.join(RUNTIMES)}")


@dataclass(frozen=True)
class CostSpec:
    """The cost models a target prices and their coefficients."""

    models: tuple[str, ...]
    cycles: CyclesSpec | None = None
    energy: EnergySpec | None = None
    boundary: BoundarySpec | None = None
    latency: LatencySpec | None = None

    def __post_init__(self):
        if not self.models:
            raise SchemaError("models", "is empty", f"list cost models from {', '.join(DIGITAL_MODELS)}")
        _unique(self.models, "models")


@dataclass(frozen=True)
class AnalogSpec:
    """An in-memory-compute array: the energy-per-MAC grid, the noise model and the converters."""

    e_min: float
    e_max: float
    points: int
    noise: str = "thermal"
    dac_bits: int = 8
    adc_bits: int = 8
    digital_layers: tuple[str, ...] = ()
    sigma_t: float = 0.01
    weight_noise: float = 0.1
    unit: str = "a.u."

    def __post_init__(self):
        if not (math.isfinite(self.e_min) and self.e_min > 0):
            raise SchemaError("e_grid.min", f"{self.e_min!r} is not positive", "use a number > 0, e.g. 1.0")
        if not (math.isfinite(self.e_max) and self.e_max > self.e_min):
            raise SchemaError("e_grid.max", f"{self.e_max!r} is not above min {self.e_min!r}", "make max > min")
        if not 2 <= self.points <= 1000:
            raise SchemaError("e_grid.points", f"{self.points} is out of range", "use 2..1000 grid points")
        if self.noise not in NOISE_TYPES:
            raise SchemaError("noise", f"unknown noise model {self.noise!r}", f"use one of {', '.join(NOISE_TYPES)}")
        for k in ("dac_bits", "adc_bits"):
            if getattr(self, k) not in range(1, 17):
                raise SchemaError(k, f"{getattr(self, k)} is out of range", "use 1..16")
        for k in ("sigma_t", "weight_noise"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0):
                raise SchemaError(k, f"{getattr(self, k)!r} is not positive", "use a number > 0")
        _unique(self.digital_layers, "digital_layers")

    def e_grid(self) -> np.ndarray:
        """The candidate energies per MAC: ``points`` values geometrically spaced from min to max."""
        return np.geomspace(self.e_min, self.e_max, self.points)


@dataclass(frozen=True)
class Candidate:
    """One precision an op may take. ``None`` bits mean float; ``format`` is int, fp8, bf16, fp16 or float."""

    w_bits: int | None
    a_bits: int | None
    format: str = "int"

    @property
    def label(self) -> str:
        if self.w_bits is None and self.a_bits is None:
            return "float"
        if self.format in HALF_FORMATS:
            return self.format
        text = f"W{self.w_bits}A{'float' if self.a_bits is None else self.a_bits}"
        return text if self.format == "int" else f"{text}:{self.format}"


def _pair_formats(w: int | None, a: int | None, wf: tuple[str, ...], af: tuple[str, ...]) -> list[str]:
    """Formats in which the (w, a) pair can run, given the operands' allowed formats."""
    if w is None and a is None:
        return ["float"]
    if a is None:
        return [f for f in HALF_FORMATS if f in wf][:1] if w == 16 else (["int"] if "int" in wf else [])
    if w == 16 or a == 16:
        return [f for f in HALF_FORMATS if f in wf and f in af] if w == a else []
    out = ["int"] if "int" in wf and "int" in af else []
    if w == a == 8 and "fp8" in wf and "fp8" in af:
        out.append("fp8")
    return out


@dataclass(frozen=True)
class Target:
    """A deployment target. Build one with ``load_target`` (TOML) or ``Target.from_dict``."""

    name: str
    kind: str
    weights: OperandSpec
    activations: OperandSpec
    costs: CostSpec
    description: str = ""
    float_bits: int = 32
    rules: tuple[Rule, ...] = ()
    fixed: dict = field(default_factory=dict)  # name -> {"w": bits | None, "a": bits | None[, "e": E]}
    analog: AnalogSpec | None = None
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise SchemaError("name", f"{self.name!r} has characters other than letters, digits, '-', '_'",
                              "rename the target")
        if self.kind not in ("digital", "analog"):
            raise SchemaError("kind", f"unknown kind {self.kind!r}", "use 'digital' or 'analog'")
        if self.float_bits not in (16, 32):
            raise SchemaError("float_bits", f"{self.float_bits} is not 16 or 32", "use 32 (fp32) or 16 (bf16/fp16)")
        self._check_rules()
        self._check_costs()
        for name, fx in self.fixed.items():
            e = fx.get("e")
            if e is not None and (self.kind != "analog" or not (math.isfinite(e) and e > 0)):
                raise SchemaError(f"fixed.{name}", f"e = {e!r} is not a positive energy on an analog target",
                                  "give e (> 0) only on kind = 'analog' targets")
            for slot, spec, what in (("w", self.weights, "weights"), ("a", self.activations, "activations")):
                if fx.get(slot) is not None and fx[slot] not in spec.bits:
                    raise SchemaError(f"fixed.{name}", f"{slot} = {fx[slot]} is not an allowed width",
                                      f"use one of {what}.bits {list(spec.bits)}")
        if self.kind == "analog" and self.analog is None:
            raise SchemaError("analog", "missing for kind = 'analog'", "add an [analog] table with e_grid and noise")
        if self.kind == "digital" and self.analog is not None:
            raise SchemaError("analog", "given for kind = 'digital'", "set kind = 'analog' or drop [analog]")
        if self.analog is not None and max(self.activations.bits) > self.analog.dac_bits:
            raise SchemaError("analog.dac_bits", f"{self.analog.dac_bits} is below the widest activation "
                              f"({max(self.activations.bits)} bits)", "raise dac_bits or narrow activations.bits")

    def _check_rules(self) -> None:
        seen: dict[str, int] = {}
        for i, r in enumerate(self.rules):
            key = f"rules[{i}]"
            for op in r.ops:
                if op in seen:
                    raise SchemaError(f"{key}.ops", f"op type {op!r} is already in rules[{seen[op]}]",
                                      "list each op kind in one rule")
                seen[op] = i
            for op in r.ops:  # the w slot of an activation x activation matmul is its second operand
                w_ok = self.activations.bits if op == "matmul" else self.weights.bits
                for name, allowed in (("weight_bits", w_ok), ("act_bits", self.activations.bits),
                                      ("weight_only_bits", self.weights.bits)):
                    for b in getattr(r, name) or ():
                        if b not in allowed:
                            raise SchemaError(f"{key}.{name}", f"{b} is not an allowed width",
                                              f"use widths from {list(allowed)}")
                for p in r.pairs or ():
                    if p[0] not in w_ok or p[1] not in self.activations.bits:
                        raise SchemaError(f"{key}.pairs", f"{list(p)} uses a width the target does not allow",
                                          "use widths from [weights].bits and [activations].bits")

    def _check_costs(self) -> None:
        allowed = ANALOG_MODELS if self.kind == "analog" else DIGITAL_MODELS
        for m in self.costs.models:
            if m not in allowed:
                raise SchemaError("costs.models", f"unknown cost model {m!r} for a {self.kind} target",
                                  f"use models from {', '.join(allowed)}")
        needs = {"cycles": "slice_bits = 2", "boundary": "per_element = 0.001", "latency": "runtime = ..."}
        if self.kind == "digital":
            needs["energy"] = "c0 and c_wa in pJ"
        for m, example in needs.items():
            spec = getattr(self.costs, m)
            if m in self.costs.models and spec is None:
                raise SchemaError(f"costs.{m}", f"missing: cost model '{m}' needs coefficients",
                                  f"add a [costs.{m}] table ({example})")
            if spec is not None and m not in self.costs.models:
                raise SchemaError(f"costs.{m}", f"given but '{m}' is not in costs.models",
                                  f"add '{m}' to costs.models or drop the table")
        b = self.costs.boundary
        if b is not None and b.applies_to not in self.costs.models:
            raise SchemaError("costs.boundary.applies_to", f"'{b.applies_to}' is not in costs.models",
                              "add it to costs.models or choose another row")

    # -- public view -------------------------------------------------------------------------------------
    weight_bits = property(lambda self: self.weights.bits, doc="allowed weight widths")
    act_bits = property(lambda self: self.activations.bits, doc="allowed activation widths")
    granularities = property(lambda self: self.weights.granularity, doc="'layer' and/or 'channel'")
    symmetric_acts = property(lambda self: self.activations.symmetric)
    symmetric_weights = property(lambda self: self.weights.symmetric)
    cost_models = property(lambda self: self.costs.models, doc="names of the cost models this target prices")

    def rule_for(self, op_kind) -> Rule | None:
        kind = kind_name(op_kind)
        return next((r for r in self.rules if kind in r.ops), None)

    def candidate_specs(self, op_kind) -> list[Candidate]:
        """Every precision (with its format) the target runs for ``op_kind``; [] for kinds with no precision."""
        kind = kind_name(op_kind)
        if kind not in OP_KINDS:
            raise ValueError(f"unknown op kind {kind!r}; use one of {', '.join(OP_KINDS)}")
        if kind not in QUANTIZABLE_KINDS:
            return []
        r = self.rule_for(kind)
        w_spec = self.activations if kind == "matmul" else self.weights
        pairs: list[tuple[int | None, int | None]] = []
        if kind == "embedding":  # a table look-up: only the weights have a precision
            if r is not None and r.weight_only_bits is not None:
                pairs += [(w, None) for w in r.weight_only_bits]
            else:
                pairs += [(w, None) for w in (r.weight_bits if r and r.weight_bits else w_spec.bits)]
        else:
            if r is not None and r.pairs is not None:
                pairs += [tuple(p) for p in r.pairs]
            else:
                ws = (r.weight_bits if r and r.weight_bits else None) or w_spec.bits
                acts = (r.act_bits if r and r.act_bits else None) or self.activations.bits
                pairs += [(w, a) for w in ws for a in acts]
            if kind != "matmul":  # weight-only means nothing when both operands are activations
                pairs += [(w, None) for w in ((r.weight_only_bits or ()) if r else ())]
        if r is not None and r.float:
            pairs.append((None, None))
        out = []
        for w, a in pairs:
            for f in _pair_formats(w, a, w_spec.formats, self.activations.formats):
                if r is None or r.formats is None or f in r.formats or f == "float":
                    out.append(Candidate(w, a, f))
        return list(dict.fromkeys(out))

    def candidates(self, op_kind) -> list[tuple[int | None, int | None]]:
        """The allowed joint ``(w_bits, a_bits)`` of ``op_kind``; ``None`` means float."""
        return list(dict.fromkeys((c.w_bits, c.a_bits) for c in self.candidate_specs(op_kind)))

    def to_dict(self) -> dict:
        """The TOML-shaped description (``Target.from_dict(t.to_dict()) == t``)."""
        from .loader import target_to_dict

        return target_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> Target:
        """Validate a TOML-shaped mapping; ``UserError`` ("{source}: {key}: {problem}; {fix}") on any problem."""
        from .loader import target_from_dict

        return target_from_dict(data, source)
