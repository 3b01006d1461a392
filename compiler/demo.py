"""`mpqc demo`: a first run that needs nothing: train the digits CNN, compile it twice, print the reports."""

from __future__ import annotations

import os
import time

import torch
from rich.console import Console
from rich.table import Table

from mpqc.atomic import atomic_write_with, ensure_dir
from mpqc.errors import UserError

from .data import load_data
from .pipeline import compile
from .train import train_float
from .zoo import DigitsCNN

TARGETS = (
    ("analog", {"target": "analog", "emac": "100", "granularity": "channel"}),  # one E per array column
    ("bitserial", {"target": "bitserial", "avg_bits": "W3A4"}),
)


def run_demo(out: str, *, epochs: int = 3, seed: int = 0, quiet: bool = False) -> dict:
    console = Console(quiet=quiet)
    t0 = time.perf_counter()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UserError(f"--epochs {epochs!r} must be an integer >= 0")
    ensure_dir(out)
    model_path = os.path.join(out, "digits_cnn.pt")
    data = load_data("digits", seed=seed)
    if not os.path.exists(model_path):
        console.print("[bold]1/3[/bold] training a small CNN on the digits data (8x8 images, 10 classes)…")
        torch.manual_seed(seed)
        model = train_float(DigitsCNN(), data, epochs=15, seed=seed)
        atomic_write_with(model_path, lambda tmp: torch.save(model.state_dict(), tmp))
    summary: dict = {"model": model_path, "runs": {}}
    for i, (name, kw) in enumerate(TARGETS, start=2):
        budget = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items() if k != "target")
        console.print(f"[bold]{i}/3[/bold] mpqc compile digits_cnn.pt --target {kw['target']} {budget} --data digits")
        res = compile(model_path, arch="mpqc.compiler.zoo:digits_cnn", data="digits", out=os.path.join(out, name),
                      epochs=epochs, seed=seed, progress=not quiet, **kw)
        summary["runs"][name] = {"report": res.paths.get("report.html"), "accuracy": res.metrics.get("accuracy"),
                                 "analog": res.metrics.get("analog")}
    table = Table(title="mpqc demo: digits CNN")
    table.add_column("target")
    table.add_column("model")
    table.add_column("top-1 (%)", justify="right")
    for name, run in summary["runs"].items():
        for k, v in (run["accuracy"] or {}).items():
            table.add_row(name, k, f"{v:.2f}")
    console.print(table)
    for name, run in summary["runs"].items():
        console.print(f"report ({name}): {run['report']}")
    summary["time_s"] = time.perf_counter() - t0
    console.print(f"done in {summary['time_s']:.0f} s")
    return summary


__all__ = ["run_demo"]
