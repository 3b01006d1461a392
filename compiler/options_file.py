"""The compile options as a TOML file: what a compile writes as OUTDIR/compile.toml, so a run can be repeated.

Keys are the command line's long option names without the dashes (``avg-bits = "W3A3"``, ``output = "out"``),
so a file and a command line say the same thing in the same words; ``mpqc compile --config FILE`` reads it back
(mpqc/commands/config_file.py checks it against the parser). Options left at None are not written (TOML has
no null); ``progress`` and ``stop_after`` describe one invocation, not the compile, and are left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

# the field of CompileOptions -> its key (the long option name), where they differ beyond '_' -> '-'
_KEY = {"out": "output"}
_SKIP = ("progress", "stop_after")


def key_of(field_name: str) -> str:
    return _KEY.get(field_name, field_name.replace("_", "-"))


def toml_value(v: Any) -> str:
    """``v`` as a TOML value (bool, int, float, str or a list of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        return repr(v)
    if isinstance(v, str):  # a TOML basic string takes JSON's escapes (non-ASCII kept as UTF-8); TOML also
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # forbids a raw DEL
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def options_toml(options) -> str:
    """The TOML text of a CompileOptions (see the module docstring)."""
    lines = ["# mpqc compile options; repeat this compile with: mpqc compile --config THIS_FILE",
             "# (relative paths are relative to the directory the command is run from)"]
    for f in fields(options):
        v = getattr(options, f.name)
        if f.name in _SKIP or v is None:
            continue
        lines.append(f"{key_of(f.name)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"
