"""``--config FILE``: a command's options from a TOML file, the command line overriding it.

Keys are the long option names without the dashes (``avg-bits = "W3A3"``, ``weight-alpha = 0.151``,
``fix = ["conv1=W8A8"]``, ``batch-stats = false``); the positional MODEL is ``model``. Tables only group keys
for the reader (``[budgets]``, ``[finetune]``, any name): they are flattened. Each value is checked by the
parser's own type and choices, as if it had been typed on the command line, so a file cannot say what the
command line would refuse. What compile writes as OUTDIR/compile.toml (compiler/options_file.py) reads back.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mpqc.compiler.options_file import toml_value
from mpqc.errors import UserError

_NOT_IN_FILES = ("config", "json", "help", "_run", "_parser", "_options_file")


def _keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for a in parser._actions:
        if a.dest in _NOT_IN_FILES or a.dest == argparse.SUPPRESS:
            continue
        longs = [s for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")]
        out[longs[0][2:] if longs else a.dest.replace("_", "-")] = a
    return out


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the command line itself set (a default never counts, even one typed out)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


def _flatten(data: dict, file: str, prefix: str, out: dict[str, tuple[str, Any]]) -> None:
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            _flatten(v, file, where, out)
        elif k in out:
            raise UserError(f"--config {file}: {where} repeats {out[k][0]}; give each option once in the file")
        else:
            out[k] = (where, v)


def _convert(a: argparse.Action, where: str, v: Any, path: str) -> Any:
    def bad(why: str):
        try:
            shown = toml_value(v)
        except TypeError:
            shown = type(v).__name__
        return UserError(f"--config {path}: {where} = {shown}: {why}; change it in the file")

    if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(v, bool):
            raise bad("expected true or false")
        return v
    if isinstance(a, argparse._AppendAction):
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise bad('expected a list of strings, e.g. ["a", "b"]')
        return [_one(a, x, bad) for x in items]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise bad("expected one value (a string or a number)")
    return _one(a, v, bad)


def _one(a: argparse.Action, v: Any, bad) -> Any:
    text = repr(v) if isinstance(v, float) else str(v)
    value = text
    if a.type is not None:
        try:
            value = a.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            what = {int: "expected an integer", float: "expected a number"}.get(a.type)
            raise bad(what or str(e) or "not a valid value") from None
    if a.choices is not None and value not in a.choices:
        raise bad(f"choose one of {', '.join(map(str, a.choices))}")
    return value


def apply_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> None:
    """Set on ``args`` every option of the file ``args.config`` that the command line (``argv``) did not give."""
    path = args.config
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file; give the path of a TOML options file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML ({e}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e}); give a readable UTF-8 TOML file") from None
    keys = _keys(parser)
    flat: dict[str, tuple[str, Any]] = {}
    _flatten(data, path, "", flat)
    given = _given(parser, argv)
    for k, (where, v) in flat.items():
        if k not in keys:
            close = difflib.get_close_matches(k, list(keys), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the keys are the long option names: {', '.join(keys)}"
            raise UserError(f"--config {path}: unknown key '{where}'; {hint}")
        a = keys[k]
        value = _convert(a, where, v, path)
        if a.dest not in given:
            setattr(args, a.dest, value)


def require(args: argparse.Namespace, *names: str) -> None:
    """The options a command cannot run without, once the config file has been applied."""
    for name in names:
        if getattr(args, name.replace("-", "_"), None) is None:
            flag = "MODEL" if name == "model" else f"--{name}"
            raise UserError(f"{flag} is missing: give it on the command line or as {name} = ... in --config")
