"""Budget options: parsing, validation, and their units. Each budget becomes one ``<=`` row of the search.

=================  ===================================  =========================================================
option             means                                row (internal unit)
=================  ===================================  =========================================================
``--bitops G``     BitOPs <= G·10^9                     Σ MACs·b_w·b_a (bit-ops)
``--avg-bits WxAy`` BitOPs <= those of the uniform      same row; the limit is the network at W x / A y over the
                   network at WxAy                      searchable layers, fixed layers at their fixed bits
``--size MIB``     weights <= MIB mebibytes             Σ numel(W)·b_w (bits; 1 MiB = 2^23 bits)
``--compression X`` weights <= fp32 weights / X         same row; limit = 32·Σ numel(W) / X
``--act-mem KIB``  Σ activation tensors <= KIB          Σ numel·b_a (bits; 1 KiB = 8192 bits), per sample
``--act-mem-max KIB`` largest activation tensor <= KIB  not a row: candidates whose tensor exceeds it are removed
``--latency MS``   Σ measured layer latency <= MS       ms from ``--lut FILE`` (``mpqc profile``)
``--energy E``     energy per forward pass <= E         target unit (pJ on bitserial, E·MAC on analog); a unit
                                                        suffix (J, mJ, uJ, nJ, pJ, fJ, aJ) is converted
``--emac E``       MAC-weighted mean energy per MAC     analog only: Σ MACs·E_l <= E·Σ MACs (analog layers)
=================  ===================================  =========================================================

A bad value is a ``UserError`` with one line naming the option, the value and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mpqc.errors import UserError

BITS_PER_MIB = 8 * 2**20
BITS_PER_KIB = 8 * 2**10
KINDS = ("bitops", "size", "act_mem", "act_mem_max", "latency", "energy", "emac")
_ENERGY_UNITS = {"J": 1.0, "mJ": 1e-3, "uJ": 1e-6, "µJ": 1e-6, "nJ": 1e-9, "pJ": 1e-12, "fJ": 1e-15, "aJ": 1e-18}
_AVG = re.compile(r"^\s*[wW](\d+)\s*[aA](\d+)\s*$")
_NUM_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµ]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """One budget as the user gave it.

    ``kind`` is the row it constrains (``KINDS``); ``value`` is in the option's unit (GBOPs, MiB, KiB, ms, the
    target's energy unit, E); ``avg_bits``/``compression`` are set for the two relative forms.
    """

    kind: str
    value: float
    option: str  # the flag as written, e.g. "--avg-bits"
    text: str  # the value as written, e.g. "W4A8"
    avg_bits: tuple[int, int] | None = None
    compression: float | None = None
    energy_unit: str | None = None  # a unit suffix given with --energy

    @property
    def label(self) -> str:
        return f"{self.option} {self.text}"

    @property
    def name(self) -> str:
        """The row name: the option without dashes (``avg-bits``, ``size``, ``compression`` ...)."""
        return self.option.lstrip("-")


def _positive(option: str, text, what: str = "a positive number") -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{option} {text!r} is not a number; give {what}") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{option} {text!r} must be {what}")
    return v


def parse_avg_bits(text: str) -> tuple[int, int]:
    """``"W4A8"`` -> (4, 8)."""
    m = _AVG.match(str(text))
    if not m:
        raise UserError(f"--avg-bits {text!r} is not of the form WxAy; write e.g. W4A8")
    w, a = int(m.group(1)), int(m.group(2))
    for b, what in ((w, "weight"), (a, "activation")):
        if not 1 <= b <= 32:
            raise UserError(f"--avg-bits {text!r}: {what} bits {b} out of range; use 1..32")
    return w, a


def parse_energy(text: str) -> tuple[float, str | None]:
    """``"5"`` -> (5, None); ``"3.2mJ"`` -> (3.2, "mJ")."""
    m = _NUM_UNIT.match(str(text))
    if not m:
        raise UserError(f"--energy {text!r} is not a number with an optional unit; write e.g. 2.5e9 or 3mJ")
    unit = m.group(2) or None
    if unit is not None and unit not in _ENERGY_UNITS:
        raise UserError(f"--energy {text!r}: unknown unit {unit!r}; use one of {', '.join(_ENERGY_UNITS)} or none "
                        "(the target's unit)")
    return _positive("--energy", m.group(1)), unit


def energy_in_unit(budget: Budget, target_unit: str) -> float:
    """The --energy value converted into the target's unit."""
    if budget.energy_unit is None:
        return budget.value
    if target_unit not in _ENERGY_UNITS:
        raise UserError(f"--energy {budget.text}: the target prices energy in {target_unit!r}, not a physical unit; "
                        "give the value without a unit")
    return budget.value * _ENERGY_UNITS[budget.energy_unit] / _ENERGY_UNITS[target_unit]


def parse_budgets(*, bitops=None, avg_bits=None, size=None, compression=None, act_mem=None, act_mem_max=None,
                  latency=None, lut=None, energy=None, emac=None) -> list[Budget]:
    """Validate the budget options (strings or numbers, None when not given) into ``Budget`` objects."""
    out: list[Budget] = []
    if bitops is not None:
        out.append(Budget("bitops", _positive("--bitops", bitops, "a positive number of GBOPs"), "--bitops",
                          str(bitops)))
    if avg_bits is not None:
        w, a = parse_avg_bits(avg_bits)
        out.append(Budget("bitops", float(w * a), "--avg-bits", str(avg_bits).strip(), avg_bits=(w, a)))
    if size is not None:
        out.append(Budget("size", _positive("--size", size, "a positive size in MiB"), "--size", str(size)))
    if compression is not None:
        x = _positive("--compression", compression, "a ratio >= 1 (fp32 weights / quantized weights)")
        if x < 1:
            raise UserError(f"--compression {compression!r} is below 1 (larger than fp32); give a ratio >= 1, "
                            "e.g. 8 for 4-bit weights")
        out.append(Budget("size", x, "--compression", str(compression), compression=x))
    if act_mem is not None:
        out.append(Budget("act_mem", _positive("--act-mem", act_mem, "a positive size in KiB"), "--act-mem",
                          str(act_mem)))
    if act_mem_max is not None:
        out.append(Budget("act_mem_max", _positive("--act-mem-max", act_mem_max, "a positive size in KiB"),
                          "--act-mem-max", str(act_mem_max)))
    if latency is not None:
        v = _positive("--latency", latency, "a positive time in ms")
        if lut is None:
            raise UserError("--latency needs a measured table: add --lut FILE (write one with `mpqc profile`)")
        out.append(Budget("latency", v, "--latency", str(latency)))
    if energy is not None:
        v, unit = parse_energy(energy)
        out.append(Budget("energy", v, "--energy", str(energy), energy_unit=unit))
    if emac is not None:
        out.append(Budget("emac", _positive("--emac", emac, "a positive energy per MAC"), "--emac", str(emac)))
    return out


def budgets_from_args(args) -> list[Budget]:
    """The budgets of an ``mpqc search`` command line (argparse namespace)."""
    return parse_budgets(bitops=args.bitops, avg_bits=args.avg_bits, size=args.size, compression=args.compression,
                         act_mem=args.act_mem, act_mem_max=args.act_mem_max, latency=args.latency, lut=args.lut,
                         energy=args.energy, emac=args.emac)


def raw_limit(budget: Budget) -> float | None:
    """The limit in the row's internal unit for the absolute forms (None for avg-bits/compression/energy)."""
    if budget.avg_bits is not None or budget.compression is not None or budget.kind == "energy":
        return None
    factor = {"bitops": 1e9, "size": BITS_PER_MIB, "act_mem": BITS_PER_KIB, "act_mem_max": BITS_PER_KIB,
              "latency": 1.0, "emac": 1.0}[budget.kind]
    return budget.value * factor


def format_value(kind: str, raw: float, energy_unit: str = "") -> str:
    """A row value in the user's unit: GBOPs, MiB, KiB, ms, energy unit."""
    if raw is None or not math.isfinite(raw):
        return "n/a"
    if kind == "bitops":
        return f"{raw / 1e9:.6g} GBOPs"
    if kind == "size":
        return f"{raw / BITS_PER_MIB:.6g} MiB"
    if kind in ("act_mem", "act_mem_max"):
        return f"{raw / BITS_PER_KIB:.6g} KiB"
    if kind == "latency":
        return f"{raw:.6g} ms"
    if kind == "emac":
        return f"{raw:.6g} {energy_unit}/MAC".strip()
    return f"{raw:.6g} {energy_unit}".strip()
