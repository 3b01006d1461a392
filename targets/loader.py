"""Read target descriptions (TOML) into ``Target``s, one clear ``UserError`` line per problem.

The parser checks keys and types here; value rules (ranges, consistency) live in the dataclasses of
``targets.schema``, so a ``Target`` built in Python is held to the same rules as one read from a file.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mpqc.errors import UserError

from .schema import (
    SCHEMA_VERSION,
    AnalogSpec,
    BoundarySpec,
    CostSpec,
    CyclesSpec,
    EnergySpec,
    LatencySpec,
    OperandSpec,
    Rule,
    SchemaError,
    Target,
)

BUILTIN_DIR = Path(__file__).resolve().parent
_MISSING = object()
_TYPES = {  # kind -> (description for messages, example)
    "str": ("a string", '"text"'), "int": ("an integer", "8"), "number": ("a number", "1.5"),
    "bool": ("true or false", "true"), "table": ("a table", "[name] or {key = value}"),
    "ints": ("a list of integers", "[4, 8]"), "strs": ("a list of strings", '["a", "b"]'),
    "pairs": ("a list of [w, a] integer pairs", "[[8, 8], [4, 8]]"), "tables": ("an array of tables", "[[rules]]"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECK = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "number": lambda v: _is_int(v) or isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "table": lambda v: isinstance(v, dict),
    "ints": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "strs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "pairs": lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_int, p))
                                                    for p in v),
    "tables": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
}


class _Table:
    """A TOML table at a dotted key path: unknown keys and wrong types raise ``SchemaError``."""

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...]):
        if not isinstance(data, dict):
            raise SchemaError(path, f"expected a table, got {type(data).__name__}", f"write it as [{path}]")
        self.data, self.path = data, path
        for k in data:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                fix = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
                raise SchemaError(self.key(k), "unknown key", fix)

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, kind: str, default: Any = _MISSING) -> Any:
        if k not in self.data:
            if default is _MISSING:
                raise SchemaError(self.key(k), "missing", f"add it ({_TYPES[kind][0]}, e.g. {_TYPES[kind][1]})")
            return default
        v = self.data[k]
        if not _CHECK[kind](v):
            raise SchemaError(self.key(k), f"expected {_TYPES[kind][0]}, got {v!r}", f"write e.g. {_TYPES[kind][1]}")
        if kind == "number":
            return float(v)
        if kind in ("ints", "strs"):
            return tuple(v)
        if kind == "pairs":
            return tuple(tuple(p) for p in v)
        return v


def _make(cls, prefix: str, **kwargs):
    """Build a dataclass, placing its own (relative) error keys under ``prefix``."""
    try:
        return cls(**kwargs)
    except SchemaError as e:
        raise e.under(prefix) from None


def _operand(data: Any, path: str) -> OperandSpec:
    keys = ("bits", "formats", "symmetric") + (("granularity",) if path == "weights" else ())
    t = _Table(data, path, keys)
    return _make(OperandSpec, path, bits=t.get("bits", "ints"), formats=t.get("formats", "strs", ("int",)),
                 symmetric=t.get("symmetric", "bool", path == "weights"),
                 granularity=t.get("granularity", "strs", ("layer",)))


def _rule(data: Any, path: str) -> Rule:
    t = _Table(data, path, ("ops", "pairs", "weight_bits", "act_bits", "weight_only_bits", "formats", "float"))
    return _make(Rule, path, ops=t.get("ops", "strs"), pairs=t.get("pairs", "pairs", None),
                 weight_bits=t.get("weight_bits", "ints", None), act_bits=t.get("act_bits", "ints", None),
                 weight_only_bits=t.get("weight_only_bits", "ints", None), formats=t.get("formats", "strs", None),
                 float=t.get("float", "bool", False))


def _fixed(data: Any) -> dict:
    """``first = 8``, ``"layer1.0.conv1" = {w = 4, a = 8}``, analog ``fc = {e = 100.0}``; unquoted dotted names
    (nested tables) are joined."""
    if not isinstance(data, dict):
        raise SchemaError("fixed", f"expected a table, got {data!r}", "write it as [fixed] with name = bits")
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if _is_int(v):
                out[name] = {"w": v, "a": v}
            elif isinstance(v, dict) and v and set(v) <= {"w", "a", "e"}:
                t = _Table(v, f"fixed.{name}", ("w", "a", "e"))
                out[name] = {"w": t.get("w", "int", None), "a": t.get("a", "int", None)}
                if "e" in v:
                    out[name]["e"] = t.get("e", "number")
            elif isinstance(v, dict) and v:
                walk(v, name)
            else:
                raise SchemaError(f"fixed.{name}", f"expected bits or {{w = .., a = ..}}, got {v!r}",
                                  f'write e.g. "{name}" = 8 or "{name}" = {{w = 4, a = 8}}')

    walk(data, "")
    return out


def _costs(data: Any) -> CostSpec:
    t = _Table(data, "costs", ("models", "cycles", "energy", "boundary", "latency"))
    sub: dict[str, Any] = {}
    if "cycles" in t.data:
        c = _Table(t.data["cycles"], "costs.cycles", ("slice_bits", "macs_per_cycle"))
        sub["cycles"] = _make(CyclesSpec, "costs.cycles", slice_bits=c.get("slice_bits", "int"),
                              macs_per_cycle=c.get("macs_per_cycle", "number", 1.0))
    if "energy" in t.data:
        c = _Table(t.data["energy"], "costs.energy", ("c0", "c_w", "c_a", "c_wa", "unit"))
        sub["energy"] = _make(EnergySpec, "costs.energy", unit=c.get("unit", "str", "pJ"),
                              **{k: c.get(k, "number", 0.0) for k in ("c0", "c_w", "c_a", "c_wa")})
    if "boundary" in t.data:
        c = _Table(t.data["boundary"], "costs.boundary", ("per_element", "applies_to"))
        sub["boundary"] = _make(BoundarySpec, "costs.boundary", per_element=c.get("per_element", "number"),
                                applies_to=c.get("applies_to", "str", "latency"))
    if "latency" in t.data:
        c = _Table(t.data["latency"], "costs.latency", ("runtime",))
        sub["latency"] = _make(LatencySpec, "costs.latency", runtime=c.get("runtime", "str"))
    return _make(CostSpec, "costs", models=t.get("models", "strs"), **sub)


def _analog(data: Any) -> AnalogSpec:
    t = _Table(data, "analog", ("e_grid", "noise", "dac_bits", "adc_bits", "digital_layers", "sigma_t",
                                "weight_noise", "unit"))
    g = _Table(t.get("e_grid", "table"), "analog.e_grid", ("min", "max", "points"))
    return _make(AnalogSpec, "analog", e_min=g.get("min", "number"), e_max=g.get("max", "number"),
                 points=g.get("points", "int"), noise=t.get("noise", "str"), dac_bits=t.get("dac_bits", "int", 8),
                 adc_bits=t.get("adc_bits", "int", 8), digital_layers=t.get("digital_layers", "strs", ()),
                 sigma_t=t.get("sigma_t", "number", 0.01), weight_noise=t.get("weight_noise", "number", 0.1),
                 unit=t.get("unit", "str", "a.u."))


def target_from_dict(data: dict, source: str = "<dict>") -> Target:
    """Validate a TOML-shaped mapping into a ``Target``; ``UserError`` "{source}: {key}: {problem}; {fix}"."""
    try:
        top = _Table(data, "", ("version", "name", "description", "kind", "float_bits", "weights", "activations",
                                "rules", "fixed", "costs", "analog"))
        version = top.get("version", "int", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SchemaError("version", f"{version} is not the supported version {SCHEMA_VERSION}",
                              f"set version = {SCHEMA_VERSION} and check the schema in targets/schema.py")
        return Target(
            name=top.get("name", "str"), kind=top.get("kind", "str"),
            description=top.get("description", "str", ""), float_bits=top.get("float_bits", "int", 32),
            weights=_operand(top.get("weights", "table"), "weights"),
            activations=_operand(top.get("activations", "table"), "activations"),
            rules=tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(top.get("rules", "tables", []))),
            fixed=_fixed(top.get("fixed", "table", {})), costs=_costs(top.get("costs", "table")),
            analog=_analog(top.data["analog"]) if "analog" in top.data else None, source=source)
    except SchemaError as e:
        raise UserError(f"{source}: {e}") from None


def target_to_dict(t: Target) -> dict:
    """The TOML-shaped mapping of a target (None-valued optional keys left out, as TOML has no null)."""
    def operand(o: OperandSpec, weights: bool) -> dict:
        d = {"bits": list(o.bits), "formats": list(o.formats), "symmetric": o.symmetric}
        return {**d, "granularity": list(o.granularity)} if weights else d

    rules = []
    for r in t.rules:
        d: dict = {"ops": list(r.ops), "float": r.float}
        for k in ("weight_bits", "act_bits", "weight_only_bits", "formats"):
            if getattr(r, k) is not None:
                d[k] = list(getattr(r, k))
        if r.pairs is not None:
            d["pairs"] = [list(p) for p in r.pairs]
        rules.append(d)
    costs: dict = {"models": list(t.costs.models)}
    if t.costs.cycles:
        costs["cycles"] = {"slice_bits": t.costs.cycles.slice_bits, "macs_per_cycle": t.costs.cycles.macs_per_cycle}
    if t.costs.energy:
        e = t.costs.energy
        costs["energy"] = {"c0": e.c0, "c_w": e.c_w, "c_a": e.c_a, "c_wa": e.c_wa, "unit": e.unit}
    if t.costs.boundary:
        costs["boundary"] = {"per_element": t.costs.boundary.per_element, "applies_to": t.costs.boundary.applies_to}
    if t.costs.latency:
        costs["latency"] = {"runtime": t.costs.latency.runtime}
    out = {"version": SCHEMA_VERSION, "name": t.name, "description": t.description, "kind": t.kind,
           "float_bits": t.float_bits, "weights": operand(t.weights, True),
           "activations": operand(t.activations, False), "rules": rules,
           "fixed": {k: {s: b for s, b in v.items() if b is not None} for k, v in t.fixed.items()}, "costs": costs}
    if t.analog:
        a = t.analog
        out["analog"] = {"e_grid": {"min": a.e_min, "max": a.e_max, "points": a.points}, "noise": a.noise,
                         "dac_bits": a.dac_bits, "adc_bits": a.adc_bits, "digital_layers": list(a.digital_layers),
                         "sigma_t": a.sigma_t, "weight_noise": a.weight_noise, "unit": a.unit}
    return out


def list_targets() -> list[str]:
    """Names of the built-in targets (the ``*.toml`` files shipped in ``mpqc/targets``)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_target(spec: str | os.PathLike) -> Target:
    """Load a built-in target by name, or a user target from a ``.toml`` path; ``UserError`` on any problem."""
    if isinstance(spec, Target):
        return spec
    text = str(spec)
    path = Path(text)
    if text.endswith(".toml") or os.sep in text or path.is_file():
        if not path.is_file():
            raise UserError(f"{text}: target file not found; pass a built-in name ({', '.join(list_targets())}) "
                            "or the path of a .toml file")
    else:
        path = BUILTIN_DIR / f"{text}.toml"
        if not path.is_file():
            close = difflib.get_close_matches(text, list_targets(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown target {text!r}{hint} (built-ins: {', '.join(list_targets())}); or pass the "
                            "path of a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the target description as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {_toml_problem(text, e)}; fix the file (schema: mpqc/targets/schema.py)") from None
    return target_from_dict(data, str(path))


def _toml_problem(text: str, e: Exception) -> str:
    """tomllib's message, with the offending key named (it reports only a line and column)."""
    m = re.search(r"at line (\d+)", str(e))
    line = text.splitlines()[int(m.group(1)) - 1].strip() if m and int(m.group(1)) <= len(text.splitlines()) else ""
    key = line.split("=", 1)[0].strip() if "=" in line else line
    what = "duplicate key" if "overwrite" in str(e) else "TOML syntax error"
    return f"{key}: {what} ({e})" if key else f"{what} ({e})"
