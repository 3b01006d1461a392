"""The ``mpqc`` command line: one sub-command per stage, each in ``mpqc/commands/<name>.py``.

Exit codes: 0 success, 1 an internal error (a bug: traceback shown), 2 bad input (one line, no traceback),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
import warnings

from mpqc import __version__
from mpqc.errors import UserError, out_of_memory_summary

# order is the order of `mpqc --help`; a module is listed once it exists
COMMANDS = ("inspect", "profile", "sensitivity", "search", "finetune", "export", "compile", "report", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad options already; keep its message to one line."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"mpqc: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpqc", description="Hardware-aware mixed-precision deployment compiler.")
    parser.add_argument("--version", action="version", version=f"mpqc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"mpqc.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"mpqc.commands.{name}":
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__)
        mod.add_arguments(p)
        p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        p.set_defaults(_run=mod.run, _parser=p, _options_file=getattr(mod, "OPTIONS_FILE", False))
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``timeout``), raised where the program is, so that the temp files of
    the writes in progress are removed and the finished stages kept, as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if not args.verbose:
        warnings.simplefilter("ignore")  # library notices would break the one-line error contract
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args._options_file and args.config is not None:  # options from a TOML file; the command line wins
            from mpqc.commands.config_file import apply_config

            argv = sys.argv[1:] if argv is None else argv
            apply_config(args._parser, argv[argv.index(args.command) + 1:], args)
        result = args._run(args)
    except UserError as e:
        print(f"mpqc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("mpqc: interrupted; finished stages are kept and a re-run resumes", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here; anything else goes on up
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, named so no command pays for torch
            raise
        print(f"mpqc: error: the device ran out of memory ({out_of_memory_summary(e)}); lower --batch-size or "
              "--samples where the command takes them, or run with --device cpu", file=sys.stderr)
        return 2
    if isinstance(result, int):
        return result
    if args.json and result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0
