"""The terminal summary of a compile run (a rich table of accuracy and costs)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(res, console: Console | None = None) -> None:
    console = console or Console()
    m = res.metrics
    t = Table(title=f"mpqc compile → {res.out}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k, v in (m.get("accuracy") or {}).items():
        t.add_row(f"top-1 {k}", f"{v:.2f} %")
    for k, c in (m.get("costs") or {}).items():
        if isinstance(c, dict) and "value" in c and not k.startswith("budget:"):
            t.add_row(k, f"{c['value']:.6g} {c.get('unit', '')}")
    for k, v in (m.get("analog") or {}).items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
    if res.reused:
        console.print(f"reused finished stages: {', '.join(res.reused)}")
    if res.stopped_after:
        console.print(f"stopped after {res.stopped_after}")
    if "report.html" in res.paths and not res.stopped_after:
        console.print(f"report: {res.paths['report.html']}")
