"""`mpqc inspect`: the IR as a table and as a JSON summary."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from .ir import Graph


def _group_of(graph: Graph) -> dict[str, str]:
    return {op.name: ",".join(op.act_inputs) for op in graph.layers()}


def inspect_summary(graph: Graph) -> dict:
    """The JSON form: quantizable layers with shapes, MACs, params and activation group, plus totals."""
    groups = _group_of(graph)
    layers = [{"name": op.name, "op": op.kind.value, "macs": op.macs, "params": op.params,
               "in_shape": op.in_shapes[0] if op.in_shapes else None, "out_shape": op.out_shape,
               "act_group": groups[op.name], "weight_shape": op.weight_shape, "fan_in": op.fan_in,
               "groups": op.groups} for op in graph.layers()]
    return {"layers": layers, "total_macs": graph.total_macs(), "total_params": graph.total_params(),
            "act_groups": [{"name": g.name, "consumers": list(g.consumers), "signed": g.signed}
                           for g in graph.act_groups()],
            "capture": graph.meta.get("capture"), "unquantized": graph.unquantized()}


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def print_inspect_table(graph: Graph, *, all_ops: bool = False, console: Console | None = None) -> None:
    # piped output has no terminal width; keep full layer names rather than wrapping them
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    groups = _group_of(graph)
    table = Table(title=f"mpqc IR ({graph.meta.get('capture')}): MACs at input shape "
                        f"{graph.meta.get('input_shapes')}")
    for col in ("name", "op", "in shape", "out shape", "MACs", "params", "act group"):
        table.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for op in (graph.ops.values() if all_ops else graph.layers()):
        table.add_row(op.name, op.kind.value, str(op.in_shapes[0] if op.in_shapes else "-"), str(op.out_shape),
                      _fmt(op.macs), _fmt(op.params), groups.get(op.name, ""))
    if graph.unquantized():
        table.add_section()
        for name, u in graph.unquantized().items():
            table.add_row(name, f"float: {u['op']}", "", "", _fmt(u.get("macs", 0)), _fmt(u["params"]), "-")
    table.add_section()
    table.add_row("total", f"{len(graph.layers())} layers", "", "", _fmt(graph.total_macs()),
                  _fmt(graph.total_params()), f"{len(graph.act_groups())} groups")
    console.print(table)
    if graph.unquantized_note():
        console.print(f"note: {graph.unquantized_note()}")
