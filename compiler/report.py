"""The report: PNG plots and one self-contained HTML page (images embedded) from a compile directory.

Everything is read back from the stage artifacts in OUT (ir.json, sensitivity.json, plan.json or, after a dxmax
fine-tuning, plan_trained.json, pareto.csv, metrics.json), so ``mpqc report OUT`` regenerates the report without
re-running anything.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpqc.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from mpqc.errors import UserError  # noqa: E402

PLOTS = ("bits", "sensitivity", "costs", "pareto")


@dataclass
class ReportInputs:
    """What the report reads from OUT; missing optional pieces leave their plot out with a note."""

    out: str
    ir: dict
    plan: dict
    sensitivity: dict | None = None
    metrics: dict = field(default_factory=dict)
    pareto: list[dict] | None = None
    manifest: dict = field(default_factory=dict)


def _read_json(path: str, required: bool):
    if not os.path.exists(path):
        if required:
            raise UserError(f"{path} not found: run `mpqc compile` into this directory first")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); re-run the stage that writes it") from None


def read_inputs(out: str) -> ReportInputs:
    if not os.path.isdir(out):
        raise UserError(f"{out} is not a directory; pass the OUTDIR of a `mpqc compile` run")
    ir = _read_json(os.path.join(out, "ir.json"), True)
    manifest = _read_json(os.path.join(out, "manifest.json"), False) or {}
    # the plan the model was fine-tuned and exported at: the searched one, or the widths dxmax learned from it
    trained = ((manifest.get("stages") or {}).get("finetune") or {}).get("outputs") or {}
    plan = _read_json(os.path.join(out, "plan_trained.json" if "plan_trained.json" in trained else "plan.json"), True)
    sens = _read_json(os.path.join(out, "sensitivity.json"), False)
    metrics = _read_json(os.path.join(out, "metrics.json"), False) or {}
    pareto = None
    p = os.path.join(out, "pareto.csv")
    if os.path.exists(p):
        with open(p) as f:
            pareto = list(csv.DictReader(f))
    return ReportInputs(out, ir, plan, sens, metrics, pareto, manifest)


def _layer_names(inp: ReportInputs) -> list[str]:
    names = [op["name"] for op in inp.ir["ops"] if op["kind"] in ("conv", "linear", "matmul", "embedding")]
    return [n for n in names if n in inp.plan.get("layers", {})] or list(inp.plan.get("layers", {}))


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _mean_bits(b) -> float | None:
    if b is None:
        return None
    if isinstance(b, list):
        return float(np.mean(b)) if b else None
    return float(b)


def plot_bits(inp: ReportInputs, path: str) -> None:
    """Per-layer weight/activation bits, or the energy per MAC on an analog target (log scale)."""
    names = _layer_names(inp)
    layers = inp.plan["layers"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    emac = [_mean_bits(layers[n].get("emac")) for n in names]
    if any(e is not None for e in emac):
        ax.bar(x, [e or 0 for e in emac], color="#4c72b0", label="mean over output channels")
        per = [(i, layers[n]["emac"]) for i, n in enumerate(names) if isinstance(layers[n].get("emac"), list)]
        if per:  # channel granularity: every channel's E as a dot over its layer's bar
            xs = np.concatenate([np.full(len(e), i, dtype=float) for i, e in per])
            ax.scatter(xs, np.concatenate([e for _, e in per]), s=6, color="#dd8452", alpha=0.6, zorder=3,
                       label="one output channel")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("energy per MAC E (target unit)")
        ax.set_title("Energy allocation per layer" + (" and output channel" if per else ""))
    else:
        w = [_mean_bits(layers[n].get("w_bits")) or 0 for n in names]
        a = [_mean_bits(layers[n].get("a_bits")) or 0 for n in names]
        per = [(i, layers[n]["w_bits"]) for i, n in enumerate(names) if isinstance(layers[n].get("w_bits"), list)]
        ax.bar(x - 0.2, w, 0.4, label="weights (mean over channels)" if per else "weights", color="#4c72b0")
        ax.bar(x + 0.2, a, 0.4, label="activations (input)", color="#dd8452")
        if per:  # kernel-wise: the span of the layer's channel widths, so a mean of 3 is not read as all 3-bit
            lo = [w[i] - min(b) for i, b in per]
            hi = [max(b) - w[i] for i, b in per]
            ax.errorbar([i - 0.2 for i, _ in per], [w[i] for i, _ in per], yerr=[lo, hi], fmt="none", ecolor="#222",
                        elinewidth=1, capsize=3, label="weights: fewest to most bits of a channel")
        ax.set_ylabel("bits")
        ax.set_ylim(0, max([*w, *a, *(max(b) for _, b in per), 1]) * 1.35)  # room for the legend above the bars
        ax.set_title("Precision per layer")
        ax.legend(loc="upper left", fontsize=8, ncols=2 if per else 1)
    ax.set_xticks(x, [_short(n) for n in names], rotation=75, fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _energy_label(e: float) -> str:
    """E 10000, E 681, E 46.4, E 1.47: whole numbers from 100 up, three digits below."""
    return f"E{e:.0f}" if e >= 100 else f"E{e:.3g}"


def plot_sensitivity(inp: ReportInputs, path: str) -> None:
    """Heat map of log10 sensitivity: layers x candidate (weights, activations, or energies)."""
    layers = (inp.sensitivity or {}).get("layers", {})
    names = [n for n in _layer_names(inp) if n in layers]
    cols: list[tuple[str, str]] = []
    for kind in ("w", "a", "e"):
        keys = sorted({k for n in names for k in (layers[n].get(kind) or {})}, key=lambda k: -float(k))
        cols += [(kind, k) for k in keys]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(cols) + 3), max(3, 0.28 * len(names) + 1.5)))
    if not names or not cols:
        ax.text(0.5, 0.5, "no sensitivity table", ha="center", va="center")
        ax.axis("off")
    else:
        m = np.full((len(names), len(cols)), np.nan)
        for i, n in enumerate(names):
            for j, (kind, k) in enumerate(cols):
                v = (layers[n].get(kind) or {}).get(k)
                if v is not None:
                    m[i, j] = np.log10(max(float(v), 1e-12))
        im = ax.imshow(m, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
        # bit-widths as they are; energies per MAC (a geometric grid, keys like 681.2920690579612) to 3 digits
        ax.set_xticks(range(len(cols)), [f"{'W' if k == 'w' else 'A'}{v}" if k in "wa" else _energy_label(float(v))
                                         for k, v in cols], rotation=60, fontsize=7)
        fig.colorbar(im, ax=ax, label="log10 score")
        ax.set_title(f"Sensitivity ({(inp.sensitivity or {}).get('method', '?')})")
    fig.tight_layout()
    _save(fig, path)


def _layer_costs(inp: ReportInputs) -> tuple[dict[str, dict[str, float]], str]:
    """Each layer's costs, priced from ir.json, plan.json and the plan's target; the second value says why there
    are none (a target that no longer loads still gives BitOPs and size, at 32-bit floats)."""
    from mpqc.targets import load_target

    from .ir import Graph
    from .plan import Plan, layer_costs

    try:
        graph, plan = Graph.from_dict(inp.ir), Plan.from_dict(inp.plan)
    except (ValueError, TypeError, KeyError) as e:
        return {}, f"ir.json or plan.json could not be read back ({e})"
    try:
        target = load_target(plan.target)
    except UserError:
        target = _BareTarget()
    rows = layer_costs(plan, graph, target)
    for row in rows.values():
        row.pop("analog_macs", None)
    return rows, ""


_COST_LABELS = {"bitops": "BitOPs", "size": "weight bytes", "cycles": "cycles", "energy": "energy",
                "latency": "latency"}


class _BareTarget:
    """What pricing needs of a target that cannot be loaded: no models beyond BitOPs and size."""

    cost_models = ()
    kind = "digital"
    float_bits = 32


def plot_costs(inp: ReportInputs, path: str) -> None:
    """Each layer's share of every cost that adds up layer by layer (BitOPs, weight bytes, cycles, energy...)."""
    per_layer, why = _layer_costs(inp)
    names = [n for n in _layer_names(inp) if n in per_layer]
    keys = [k for k in ("bitops", "size", "cycles", "energy", "latency") if any(k in per_layer[n] for n in names)]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4) if names and keys else (6, 0.7))
    if not names or not keys:
        ax.text(0.5, 0.5, why or "no layer to price", ha="center", va="center")
        ax.axis("off")
    else:
        x = np.arange(len(names))
        width = 0.8 / len(keys)
        for i, k in enumerate(keys):
            vals = np.array([float(per_layer[n].get(k, 0.0)) for n in names])
            total = vals.sum() or 1.0
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, 100 * vals / total, width, label=_COST_LABELS[k])
        ax.set_ylabel("share of the model total (%)")
        ax.set_xticks(x, [_short(n) for n in names], rotation=75, fontsize=7)
        ax.legend(fontsize=8)
        ax.set_title("Per-layer cost breakdown")
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(inp: ReportInputs, path: str) -> None:
    """Objective (and accuracy when measured) against the swept budget, the chosen plan marked."""
    rows = inp.pareto or []
    fig, ax = plt.subplots(figsize=(6, 4) if rows else (6, 0.7))  # no sweep: a line of text, not an empty box
    if not rows:
        ax.text(0.5, 0.5, "no Pareto sweep (run with --pareto N)", ha="center", va="center")
        ax.axis("off")
    else:
        cost_key = next((k for k in rows[0] if k not in ("objective", "accuracy", "status", "chosen")), None)
        xs = [float(r[cost_key]) for r in rows if r.get("objective") not in ("", None)]
        ys = [float(r["objective"]) for r in rows if r.get("objective") not in ("", None)]
        ax.plot(xs, ys, "o-", label="objective (predicted loss increase)")
        chosen = [r for r in rows if str(r.get("chosen", "")).lower() in ("1", "true")]
        if chosen:
            ax.plot([float(chosen[0][cost_key])], [float(chosen[0]["objective"])], "r*", ms=16, label="chosen plan")
        ax.set_xlabel(cost_key)
        ax.set_ylabel("objective")
        if any(r.get("accuracy") not in ("", None) for r in rows):
            ax2 = ax.twinx()
            acc = [(float(r[cost_key]), float(r["accuracy"])) for r in rows if r.get("accuracy") not in ("", None)]
            ax2.plot(*zip(*acc), "s--", color="#55a868", label="accuracy")
            ax2.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title("Pareto front")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if v and all(isinstance(x, (int, float)) for x in v):
            return f"mixed {_fmt(min(v))}–{_fmt(max(v))} (mean {np.mean(v):.4g}, {len(v)} channels)"
        return str(v)
    return "" if v is None else str(v)


def _objective_html(meta: dict) -> str:
    """What the search minimised: activation scores + alpha x weight scores, and where alpha came from."""
    alpha = meta.get("weight_alpha")
    if alpha is None:
        return ""
    text = (f"<h2>Search objective</h2><p>activation scores + {_fmt(alpha)} × weight scores "
            f"(<code>--weight-alpha</code>)")
    rec = meta.get("recovery")
    if not rec:
        return text + ".</p>"
    text += (f", measured by probe fine-tunings ({rec.get('steps')} batches each; recovery.json): with W"
             f"{rec.get('w_bits')} weights {_fmt(100 * rec.get('rho_w', float('nan')))} % of the excess loss stays "
             f"after fine-tuning, with A{rec.get('a_bits')} activations {_fmt(100 * rec.get('rho_a', float('nan')))}"
             f" %; alpha is their ratio.</p>")
    return text


def _search_html(solver: dict, warnings: list) -> str:
    """The search in words: which solver, how close to optimal it proved the plan, how, and its warnings."""
    if not solver:
        return ""
    status, gap = solver.get("status"), solver.get("gap")
    if status == "optimal":
        how = "optimal" + (f", within {100 * gap:.3g} % of the best possible" if gap and gap > 1e-9 else "")
    elif status == "feasible" and gap is not None and np.isfinite(gap):
        how = f"feasible, not proved optimal: within {100 * gap:.3g} % of the best possible"
    else:
        how = html.escape(str(status))
    text = (f"<h2>Search</h2><p>{html.escape(str(solver.get('name')))}: {how} "
            f"({_fmt(solver.get('time_s'))} s; {solver.get('binaries')} choices in {solver.get('groups')} groups)")
    proof = solver.get("proof") or {}
    if "tried_act_choices" in proof:
        n = proof["tried_act_choices"]
        text += (f". Channel widths with searched activation widths: a Lagrangian decomposition solved the "
                 f"knapsack left by {n} activation choice{'' if n == 1 else 's'}")
        if proof.get("local_moves"):
            m = proof["local_moves"]
            text += f", a local search moved {m} activation width{'' if m == 1 else 's'}"
        if proof.get("branch_nodes"):
            text += f", and a branch-and-bound over them expanded {proof['branch_nodes']} nodes"
            if proof.get("root_gap") is not None:
                text += f" (the bound before branching left {100 * proof['root_gap']:.3g} %)"
    if proof.get("bound_from"):
        text += f"; the bound is from the {html.escape(str(proof['bound_from']))}"
    text += ".</p>"
    if warnings:
        text += "<p>Warnings:</p><ul>" + "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings) + "</ul>"
    return text


def _finetune_html(info: dict) -> str:
    """How the model was fine-tuned, and whether its last steps saw the exported numerics (the deploy tail)."""
    if not info or not info.get("epochs"):
        return ""
    text = (f"<h2>Fine-tuning</h2><p>{info.get('epochs')} epochs of {html.escape(str(info.get('method')))}, "
            f"{_fmt(info.get('final_accuracy'))} % top-1 on the validation split after fine-tuning")
    tail = info.get("deploy_tail")
    if tail:
        how = ("batch statistics folded, " if tail.get("form") == "folded" else "")
        text += (f". The last {tail.get('steps')} steps trained against the exported bias rounding "
                 f"(<code>--deploy-tail</code>): {how}{tail.get('biases_on_grid')} conv and linear biases on the "
                 f"int32 grid s<sub>in</sub>·s<sub>w</sub> by straight-through, so the fake-quant accuracy above is "
                 f"what the integer kernels compute up to the export's residual-add quantizers")
    return text + ".</p>"


def _parity_html(parity: dict | None) -> str:
    """The export's check against onnxruntime, one line per optimisation level (parity.json)."""
    if not parity or not parity.get("modes"):
        return ""
    rows = [[m.get("mode"), None if m.get("top1_agreement") is None else 100 * m["top1_agreement"],
             m.get("err_max_lsb"), m.get("err_mean_lsb"), None if m.get("exact_fraction") is None
             else 100 * m["exact_fraction"]] for m in parity["modes"]]
    verdict = "passed" if parity.get("passed") else "failed"
    text = (f"<h2>Export check</h2><p>The QDQ ONNX file in onnxruntime against its PyTorch reference (the "
            f"fine-tuned fake-quant model as deployed: biases on the integer grid) on "
            f"{parity.get('samples')} held-out samples: {verdict} (top-1 agreement needed: "
            f"{_fmt(100 * parity.get('threshold', parity.get('min_top1', 0)))} %; LSB = {_fmt(parity.get('lsb'))}, "
            f"{html.escape(str(parity.get('lsb_source')))}).</p>")
    gap = parity.get("reference_vs_trained")
    if gap:
        text += (f"<p>That reference against the fine-tuned fake-quant model itself: top-1 agreement "
                 f"{_fmt(100 * gap['top1_agreement'])} % on {gap['samples']} samples (largest output difference "
                 f"{_fmt(gap['max_abs_diff'])}); <code>--deploy-tail F</code> fine-tunes through the rounding.</p>")
    return text + _table(rows, ["onnxruntime mode", "top-1 agreement (%)", "max error (LSB)", "mean error (LSB)",
                                "samples exact (%)"])


def _run_html(out: str) -> str:
    """The options the compile ran with (compile.toml), so the page says how to make it again."""
    path = os.path.join(out, "compile.toml")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return (f"<h2>How this was made</h2><p><code>mpqc compile --config {html.escape(path)}</code> repeats it "
            f"(every finished stage reused); these are its options:</p><pre>{html.escape(text)}</pre>")


def write_report(out: str) -> dict[str, str]:
    """Write OUT/report.html and OUT/plot_*.png; returns their paths."""
    inp = read_inputs(out)
    paths = {name: os.path.join(out, f"plot_{name}.png") for name in PLOTS}
    plot_bits(inp, paths["bits"])
    plot_sensitivity(inp, paths["sensitivity"])
    plot_costs(inp, paths["costs"])
    plot_pareto(inp, paths["pareto"])
    imgs = ""
    for name, p in paths.items():
        with open(p, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        imgs += f'<figure><img alt="{name}" src="data:image/png;base64,{b64}"/></figure>\n'
    plan = inp.plan
    acc_rows = [[k, v] for k, v in (inp.metrics.get("accuracy") or {}).items()]
    cost_rows = [[k, c.get("value"), c.get("budget"), c.get("slack"), c.get("binding"), c.get("unit", "")]
                 for k, c in (plan.get("costs") or {}).items()]
    layer_rows = [[n, plan["layers"][n].get("w_bits"), plan["layers"][n].get("a_bits"),
                   plan["layers"][n].get("emac")] for n in _layer_names(inp)]
    solver = plan.get("solver") or {}
    analog = inp.metrics.get("analog")
    analog_html = ""
    if analog:
        analog_html = "<h2>Analog: energy allocation against a uniform E</h2>" + _table(
            [[k, v] for k, v in analog.items()], ["quantity", "value"])
    objective_html = _objective_html(plan.get("meta") or {})
    finetune_html = _finetune_html(((inp.manifest.get("stages") or {}).get("finetune") or {}).get("info") or {})
    stage_rows = [[k, v.get("time_s"), v.get("status", "done")] for k, v in (inp.manifest.get("stages") or {}).items()]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mpqc report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
img{{max-width:100%}}</style></head><body>
<h1>mpqc report: {html.escape(str(plan.get('target', '')))}</h1>
<p>Units: MACs by exact geometry at the captured input shape; BitOPs = Σ MACs·b_w·b_a; sizes in bytes
(MiB = 2<sup>20</sup> bytes); energy in the target's unit per forward pass, and E (analog) per MAC.</p>
<h2>Accuracy</h2>{_table(acc_rows, ["model", "top-1 accuracy (%)"])}
<h2>Budgets</h2>{_table(cost_rows, ["cost", "value", "budget", "slack", "binding", "unit"])}
{_search_html(solver, (plan.get("meta") or {}).get("warnings") or [])}
{objective_html}
{finetune_html}
{analog_html}
<h2>Plots</h2>{imgs}
<h2>Per-layer plan</h2>{_table(layer_rows, ["layer", "weight bits", "input bits", "E per MAC"])}
<h2>Stages</h2>{_table(stage_rows, ["stage", "time (s)", "status"])}
{_parity_html(_read_json(os.path.join(out, "parity.json"), False))}
{_run_html(out)}
</body></html>"""
    report = os.path.join(out, "report.html")
    atomic_write_text(report, page)
    return {"report": report, **paths}
