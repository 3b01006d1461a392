"""CIFAR-10 ResNet-20 end to end (issue 9): full-precision training, uniform LSQ QAT baselines and mpqc mixed
precision at the same BitOPs and at Uhlich et al.'s memory target, with each compile stage's time.

Steps: (1) train ResNet-20 (option-A shortcuts, ``mpqc.compiler.zoo:resnet20``) in full precision with the fast
recipe (SGD nesterov, lr 0.2 cosine, batch 256, wd 5e-4, per-sample random crops and flips done on the device, the
training set resident there; bf16 autocast and channels-last on CUDA) and save its state dict, or reuse ``--fp-
model``; (2) a sweep of the uniform W2A4 QAT's optimizer and lr (``--qat-lrs``; skipped with one setting): every
later compile uses the setting with the best W2A4 accuracy, uniform and mixed alike; (3) the compiles, ``--jobs`` of
them at once in separate processes (a ResNet-20 step is launch-bound, one process leaves most of an H100 idle), in
priority order, none started after ``--deadline`` seconds: per uniform baseline WxAy (first conv and fc fixed at 8
bits) ``mpqc.compile`` forced to uniform precision (every ``layer*`` fixed at WxAy, candidates {x, y}) and
``mpqc.compile`` mixed with the uniform row's BitOPs as budget (every layer free, candidates 2..8), fisher layer-
wise (``--sensitivity`` scores every such row by another method); kernel-wise (per-channel weight bits) and the
other sensitivity methods at the W2A4 BitOPs; Uhlich et al.'s
weight-memory target (70.1 KB = 70.1·1024 bytes, largest activation 8.1 KB) layer- and kernel-wise; (4) a markdown
table (OUT/table.md), the raw rows (OUT/results.json, rewritten after every job) and plots of accuracy against
BitOPs and against weight size (OUT/cifar_bitops.png, OUT/cifar_size.png), and each mixed row compared with
the uniform row of its plan image by image on the exported models (OUT/paired.md: the images only one of them
gets right, the paired standard error of the difference and McNemar's exact p; ``--paired DIR`` adds it to a
finished run, or to a ``--merge`` of runs on the same data: a mixed row of one run against the uniform row of
the same plan and seed in another). That error is the test set's only: ``--seed`` re-runs the compiles with
other calibration samples and another fine-tuning order, which is what measures the training's own spread; a
plan found at two seeds or more also gets a mean-over-seeds row (mean gain, its test-image se, the seed sd).

    # the GPU run (issue 9)
    python bench/bench_cifar.py --device cuda --fp-epochs 100 --qat-epochs 15 --jobs 8 --out bench_out/cifar
    # reduced CPU pipeline check (numbers not comparable to the papers)
    python bench/bench_cifar.py --device cpu --train-limit 2000 --fp-epochs 2 --qat-epochs 1 --jobs 2 \
        --rows w2a4_uniform,w2a4_mixed --qat-lrs 0.01 --out /tmp/cifar_cpu

``--train-limit N`` writes a reduced copy of the data to OUT/data (the first N training images of the shuffled
shards and a random, seed-0 subset of N // 5 test images; the stored test split is sorted by label, so a
"first N" test subset would hold one class only) and hands that directory to mpqc.compile, which reads the
whole ``cifar10:DIR`` it is given. Without it the shards in ``--data`` are used as they are (50,000 / 10,000).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCH = "mpqc.compiler.zoo:resnet20"
STAGES = ("capture", "sensitivity", "search", "finetune", "export")


def _bad(msg: str):
    """A bad option: one line on stderr, exit code 2 (what argparse does)."""
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_plan(text: str) -> tuple[int, int]:
    t = text.strip().lower()
    w, _, a = t[1:].partition("a")
    if not (t.startswith("w") and w.isdigit() and a.isdigit() and 2 <= int(w) <= 8 and 2 <= int(a) <= 8):
        _bad(f"--plans: {text!r} is not of the form wXaY with X, Y in 2..8 (e.g. w2a4)")
    return int(w), int(a)


def reduced_data(src: str, out: str, train_limit: int, test_limit: int, seed: int = 0) -> str:
    """Write the first ``train_limit`` training images and a random ``test_limit`` test subset to ``out``."""
    os.makedirs(out, exist_ok=True)
    xs, ys = [], []
    for f in sorted(glob.glob(os.path.join(src, "*train*.npz"))):
        with np.load(f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
        if sum(len(x) for x in xs) >= train_limit:
            break
    x, y = np.concatenate(xs)[:train_limit], np.concatenate(ys)[:train_limit]
    np.savez(os.path.join(out, "train-0.npz"), x=x, y=y)
    with np.load(os.path.join(src, "test.npz")) as z:
        idx = np.sort(np.random.default_rng(seed).permutation(len(z["y"]))[:test_limit])
        np.savez(os.path.join(out, "test.npz"), x=z["x"][idx], y=z["y"][idx])
    return out


def train_fp(data, *, epochs: int, lr: float, batch_size: int, wd: float, device: torch.device, seed: int = 0,
             model: torch.nn.Module | None = None, log_every: int = 10):
    """The documented fast recipe (``mpqc.compiler.train.train_float`` on ``device``), with the test accuracy
    every ``log_every`` epochs. Trains ``model`` (default a fresh ResNet-20); returns it in eval mode on the
    CPU, and the training seconds."""
    from mpqc.compiler.train import evaluate, train_float
    from mpqc.compiler.zoo import resnet20

    model = model if model is not None else resnet20()
    t0 = time.perf_counter()

    def progress(epoch: int, loss: float) -> None:
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            acc = evaluate(model.eval(), data.val, batch_size=1000, device=device)
            print(f"  fp epoch {epoch + 1}/{epochs}: loss {loss:.4f}, test {acc:.2f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    train_float(model, data, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=wd, seed=seed,
                progress=progress, device=device, channels_last=True)  # also on the CPU (bench_train_step.py)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return model, train_s


def _cost(costs: dict, key: str):
    v = costs.get(key)
    return v.get("value") if isinstance(v, dict) else v


def uniform_bitops(arch_fn, w: int, a: int, *, ends: tuple[str, ...] = ("conv1", "fc"), end_bits: int = 8,
                   input_shape=(1, 3, 32, 32), target: str = "generic") -> float:
    """BitOPs of the uniform WxAy plan with the ``ends`` at ``end_bits`` (what a uniform baseline costs).

    Mixed plans are given this as their ``bitops`` budget with every layer free, the ends included: matching the
    uniform plan's cost, not its choice of which layers stay at 8 bits.
    """
    from mpqc.compiler.capture import capture
    from mpqc.compiler.plan import LayerPlan, plan_costs, uniform_plan
    from mpqc.targets import load_target

    graph = capture(arch_fn().eval(), (torch.zeros(*input_shape),), fold_bn=True).graph
    plan = uniform_plan(graph, w, a, target)
    for name in ends:
        if name in plan.layers:
            plan.layers[name] = LayerPlan(end_bits, end_bits)
    for g in graph.act_groups():  # a tensor read by an end layer (the image) is at the end bits too
        if any(c in ends for c in g.consumers):
            plan.act_groups[g.name] = end_bits
    return float(plan_costs(plan, graph, load_target(target))["bitops"]["value"])


def parse_setting(text: str) -> tuple[str, float]:
    """``0.001`` (SGD) or ``adam:1e-4``: the fine-tuning optimizer and its lr."""
    opt, _, lr = text.strip().rpartition(":")
    opt = opt.lower() or "sgd"
    if opt not in ("sgd", "adam", "adamw"):
        _bad(f"--qat-lrs: {text!r}: the optimizer must be sgd, adam or adamw")
    try:
        value = float(lr)
    except ValueError:
        value = float("nan")
    if not value > 0:
        _bad(f"--qat-lrs: {text!r} is not LR or OPTIMIZER:LR with LR > 0 (e.g. 0.01 or adam:1e-4)")
    return opt, value


# --------------------------------------------------------------------------------------------------------
# the compiles
UHLICH_WEIGHT_KB = 70.1  # Uhlich et al.'s CIFAR-10 ResNet-20 targets (seeds.md 4.3), KB = 1024 bytes
UHLICH_ACT_MAX_KB = 8.1


def make_jobs(plans, lr: float, methods, extra: bool, bitops_of, opt: str = "sgd") -> list[dict]:
    """Every compile of the bench, most important first (a deadline cuts the tail).

    Uniform rows fix conv1 and fc at 8 bits (the usual baseline); mixed rows get the uniform row's BitOPs
    (``bitops_of(w, a)``) as their budget and choose every layer, the ends included, unless ``fix_ends``.
    """
    jobs = []

    def add(key, label, uniform=False, w=None, a=None, fix_ends=False, **kw):
        if "budget" in kw:
            budget = kw.pop("budget")
        elif uniform or fix_ends:
            budget = {"avg_bits": f"W{w}A{a}"}
        else:
            budget = {"bitops": f"{bitops_of(w, a) / 1e9:.9f}"}
        jobs.append({"key": key, "label": label, "uniform": uniform, "w": w, "a": a, "lr": lr, "opt": opt,
                     "fix_ends": uniform or fix_ends, "sensitivity": kw.pop("sensitivity", "fisher"),
                     "granularity": kw.pop("granularity", "layer"), "budget": budget, "group": kw.pop("group")})

    order = sorted(plans, key=lambda p: {(2, 4): 0, (3, 3): 1, (2, 2): 2, (4, 4): 3}.get(p, 9))
    for w, a in order:
        add(f"w{w}a{a}_mixed", f"W{w}A{a} BitOPs, mpqc mixed (fisher, layer)", w=w, a=a, group="mixed")
        add(f"w{w}a{a}_uniform", f"W{w}A{a} uniform (LSQ QAT)", uniform=True, w=w, a=a, group="uniform")
    if not extra:
        return jobs
    if (2, 4) in plans:
        add("w2a4_mixed_channel", "W2A4 BitOPs, mpqc mixed (fisher, kernel-wise)", w=2, a=4, granularity="channel",
            group="kernel")
        add("w2a4_mixed_ends8", "W2A4 BitOPs, mpqc mixed (fisher, layer), conv1 and fc fixed at 8", w=2, a=4,
            fix_ends=True, group="ablation")
    mem = {"size": f"{UHLICH_WEIGHT_KB / 1024:.8f}", "act_mem_max": f"{UHLICH_ACT_MAX_KB}"}
    add("mem_layer", f"weights <= {UHLICH_WEIGHT_KB} KB, act max <= {UHLICH_ACT_MAX_KB} KB, mpqc (fisher, layer)",
        budget=mem, group="memory")
    add("mem_channel", f"weights <= {UHLICH_WEIGHT_KB} KB, act max <= {UHLICH_ACT_MAX_KB} KB, mpqc (fisher, "
        "kernel-wise)", budget=mem, granularity="channel", group="memory")
    if (2, 4) in plans:
        for m in methods:
            add(f"w2a4_mixed_{m}", f"W2A4 BitOPs, mpqc mixed ({m}, layer)", w=2, a=4, sensitivity=m, group="methods")
    for w, a in [(3, 3), (2, 2)]:
        if (w, a) in plans:
            add(f"w{w}a{a}_mixed_channel", f"W{w}A{a} BitOPs, mpqc mixed (fisher, kernel-wise)", w=w, a=a,
                granularity="channel", group="kernel")
    return jobs


def sweep_jobs(settings: list[tuple[str, float]], plans: list[tuple[int, int]], keep: set | None,
               seed: int) -> list[dict]:
    """The optimizer / lr sweep on uniform W2A4: one job per setting when there are several and W2A4 is planned,
    narrowed like every other row by ``--rows`` (``keep``), so that ``--rows none`` runs none of it."""
    if len(settings) < 2 or (2, 4) not in plans:
        return []
    sweep = [{**make_jobs([(2, 4)], v, [], False, lambda w, a: 0.0, o)[1], "key": f"w2a4_uniform_{o}{v:g}",
              "label": f"W2A4 uniform (LSQ QAT), {o} lr {v:g}", "group": "lr-sweep", "seed": seed}
             for o, v in settings]  # the seed goes with the row: the chosen one is the W2A4 pairs' baseline
    return [j for j in sweep if keep is None or j["key"] in keep]


def with_method(jobs: list[dict], method: str) -> list[dict]:
    """The jobs with every default-method (fisher) mixed row scored by ``method`` instead, its label saying so.

    Rows that already name another method (the W2A4 method comparison) and the uniform rows keep theirs."""
    out = []
    for j in jobs:
        if not j["uniform"] and j["sensitivity"] == "fisher" and method != "fisher":
            j = {**j, "sensitivity": method, "label": j["label"].replace("(fisher,", f"({method},")}
        out.append(j)
    return out


def run_job(job: dict, common: dict) -> dict:
    """One ``mpqc.compile`` (in a worker process); a row for the table, or the error it raised."""
    import mpqc

    torch.set_num_threads(common["threads"])
    out = os.path.join(common["out"], job["key"])
    fix = ("conv1=8", "fc=8") if job["fix_ends"] else ()
    kw = dict(fix=fix, epochs=common["qat_epochs"], lr=job["lr"], optimizer=job.get("opt", "sgd"),
              batch_size=common["batch_size"], deploy_tail=common.get("deploy_tail", 0.0),
              residual_quant=common.get("residual_quant", True),
              sensitivity=job["sensitivity"], granularity=job["granularity"], samples=common["samples"],
              progress=False, device=common["device"], seed=common.get("seed", 0), **job["budget"])
    if not job["uniform"] and common.get("weight_alpha", 1.0) != 1.0:
        kw["weight_alpha"] = common["weight_alpha"]
        if kw["weight_alpha"] == "auto":
            kw["probe_steps"] = common.get("probe_steps", 100)
    if job["uniform"]:  # every searchable layer fixed at WxAy: the search has nothing to choose
        w, a = job["w"], job["a"]
        kw["fix"] = (f"layer*=W{w}A{a}", *fix)
        kw["candidates"] = ",".join(str(b) for b in sorted({w, a}, reverse=True))
    row = {**job, "out": out, "acc_fq": None, "acc_onnx": None, "bitops": None, "size": None, "costs": {},
           "times": dict.fromkeys(STAGES), "wall_s": None, "error": None}
    t0 = time.perf_counter()
    try:
        res = mpqc.compile(common["model"], arch=common["arch"], target=common["target"], data=common["spec"],
                           out=out, **kw)
    except Exception as e:  # noqa: BLE001 - report it in the table and go on with the other rows
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()
        row["wall_s"] = time.perf_counter() - t0
        return row
    row["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    acc = res.metrics.get("accuracy", {})
    costs = res.metrics.get("costs", {})
    row.update(acc_fq=acc.get("fake-quant (PyTorch)"), acc_onnx=acc.get("exported ONNX (onnxruntime)"),
               acc_fp=acc.get("full precision"), bitops=_cost(costs, "bitops"), size=_cost(costs, "size"),
               costs={k: _cost(costs, k) for k in costs},
               times={st: stages.get(st, {}).get("time_s") for st in STAGES})
    try:
        with open(os.path.join(out, "plan.json")) as f:
            plan = json.load(f)
        row["bits"] = {n: [lp.get("w_bits"), lp.get("a_bits")] for n, lp in plan.get("layers", {}).items()}
        row["alpha_used"] = plan.get("meta", {}).get("weight_alpha")
        if plan.get("meta", {}).get("recovery"):
            row["recovery"] = plan["meta"]["recovery"]
    except (OSError, ValueError):
        pass
    return row


def run_jobs(jobs: list[dict], common: dict, n_jobs: int, deadline: float, on_row) -> list[dict]:
    """Run ``jobs`` on ``n_jobs`` spawned processes in order; those not started by ``deadline`` are skipped."""
    rows: list[dict] = []
    if n_jobs <= 1:
        for job in jobs:
            if time.time() > deadline:
                rows.append({**job, "error": "not run: deadline"})
                continue
            rows.append(run_job(job, common))
            on_row(rows[-1])
        return rows
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
        pending = list(jobs)
        running: dict = {}
        while pending or running:
            while pending and len(running) < n_jobs:
                job = pending.pop(0)
                if time.time() > deadline:
                    rows.append({**job, "error": "not run: deadline"})
                    print(f"  skipped {job['key']} (deadline)", flush=True)
                    continue
                running[pool.submit(run_job, job, common)] = job
                print(f"  started {job['key']}", flush=True)
            if not running:
                break
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - a dead worker: record it and go on
                    row = {**job, "error": f"worker failed: {type(e).__name__}: {e}"}
                rows.append(row)
                on_row(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# reporting
def _alpha(a) -> str:
    """A weight-alpha for labels: a number, or auto."""
    return f"{a:g}" if isinstance(a, (int, float)) else str(a)


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_table(fp_row: dict, rows: list[dict]) -> str:
    head = ("| model | top-1 fake-quant (%) | top-1 ONNX (%) | GBitOPs | weights (KB) | QAT lr | capture s "
            "| sensitivity s | search s | finetune s | export s | compile s |")
    lines = [head, "|" + "---|" * 12]
    t = fp_row.get("train_s")
    trained = f"train {t:.0f} s" if isinstance(t, (int, float)) and math.isfinite(t) else "loaded (--fp-model)"
    lines.append(f"| FP32 ResNet-20 ({fp_row['params'] / 1e6:.2f} M params) | {fp_row['acc']:.2f} | - | "
                 f"{fp_row['gbitops']:.3f} | {fp_row['kb']:.1f} | - | {trained} | | | | | |")
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | {r['error']} |" + " |" * 10)
            continue
        t = r["times"]
        compile_s = sum(t[s] or 0 for s in ("capture", "sensitivity", "search", "finetune"))
        label = r["label"] + (f" (measured: {r['alpha_used']:.3g})" if r.get("recovery") else "")
        lines.append(f"| {label} | {_f(r['acc_fq'], '.2f')} | {_f(r['acc_onnx'], '.2f')} | "
                     f"{_f(None if r['bitops'] is None else r['bitops'] / 1e9, '.4f')} | "
                     f"{_f(None if r['size'] is None else r['size'] / 1024, '.1f')} | "
                     f"{r.get('opt', 'sgd')} {r['lr']:g} | "
                     + " | ".join(_f(t[s], '.1f') for s in STAGES) + f" | {compile_s:.0f} |")
    return "\n".join(lines)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split at least this uneven of the b + c images on which
    two models disagree, if each were equally likely to be the one that is right (binomial, p = 1/2)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_rows(rows: list[dict], ds, threads: int, hits: dict | None = None) -> list[dict]:
    """Each mixed row against the uniform row of its plan, image by image on the same test set (ONNX).

    The two models see the same images, so the test-sampling error of their difference comes from the images on
    which they disagree only: se = sqrt(b + c - (b - c)^2 / n) / n for b images only the mixed model gets right
    and c only the uniform one does. Seed-to-seed variation of the training is not in it. ``hits`` (directory ->
    per-image right/wrong) is filled for ``seed_means``.
    """
    ok = [r for r in rows if not r.get("error") and r.get("out") and r.get("w") is not None
          and r.get("group") != "lr-sweep" and os.path.isfile(os.path.join(r["out"], "model.onnx"))]
    base = {(r["w"], r["a"], r.get("seed", 0)): r for r in ok if r.get("uniform")}
    from mpqc.compiler.pipeline import ort_hits

    cache: dict = {} if hits is None else hits

    def correct(r):
        if r["out"] not in cache:  # by directory: merged runs repeat keys
            cache[r["out"]] = ort_hits(os.path.join(r["out"], "model.onnx"), ds, threads)
        return cache[r["out"]]

    pairs = []
    for r in ok:
        u = base.get((r["w"], r["a"], r.get("seed", 0)))
        if r.get("uniform") or u is None:
            continue
        m, b0 = correct(r), correct(u)
        n, b, c = len(m), int((m & ~b0).sum()), int((~m & b0).sum())
        vs = u["key"] + (f" [seed {u['seed']}]" if u.get("seed") else "")
        fq = (r["acc_fq"] - u["acc_fq"]) if r.get("acc_fq") is not None and u.get("acc_fq") is not None else None
        pairs.append({"key": r["key"], "label": r["label"], "uniform": vs, "n": n, "seed": r.get("seed", 0),
                      "mixed_out": r["out"], "uniform_out": u["out"], "fq_diff": fq,
                      "plan": [r["key"], r.get("sensitivity"), r.get("granularity"), r.get("weight_alpha")],
                      "acc_mixed": 100.0 * m.mean(), "acc_uniform": 100.0 * b0.mean(),
                      "both": int((m & b0).sum()), "mixed_only": b, "uniform_only": c,
                      "diff": 100.0 * (b - c) / n, "se": 100.0 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n,
                      "p": mcnemar_p(b, c)})
    return pairs


def seed_means(pairs: list[dict], hits: dict) -> list[dict]:
    """The gain of each mixed plan averaged over the seeds it was run with (plans run with two seeds or more).

    Two spreads, because they answer different questions: ``se_images`` is the test-sampling error of the mean
    gain with the trained models held fixed (per image, the seed-averaged difference of right answers), and
    ``sd_seeds`` is how much the gain moves from one training seed to the next.
    """
    groups: dict = {}
    for q in pairs:  # the same plan settings; labels differ by their "[seed N]" and by the bench's version
        groups.setdefault(json.dumps(q["plan"]), {})[q["seed"]] = q
    out = []
    for by_seed in groups.values():
        if len(by_seed) < 2:
            continue
        qs = [by_seed[s] for s in sorted(by_seed)]
        d = np.mean([hits[q["mixed_out"]].astype(np.float64) - hits[q["uniform_out"]] for q in qs], axis=0)
        diffs = [q["diff"] for q in qs]
        fqs = [q["fq_diff"] for q in qs]
        label = re.sub(r" \[seed \d+\]$", "", qs[0]["label"])
        out.append({"label": label, "seeds": sorted(by_seed), "diff": float(np.mean(diffs)),
                    "se_images": 100.0 * float(d.std()) / math.sqrt(len(d)),
                    "sd_seeds": float(np.std(diffs, ddof=1)),
                    "fq_diff": None if None in fqs else float(np.mean(fqs))})
    return out


def fmt_paired(pairs: list[dict], means: list[dict] = ()) -> str:
    lines = ["| mixed row (ONNX) | vs | both right | mixed only | uniform only | difference (points) | paired se "
             "| McNemar p |", "|" + "---|" * 8]
    for q in pairs:
        lines.append(f"| {q['label']} | {q['uniform']} | {q['both']} | {q['mixed_only']} | {q['uniform_only']} | "
                     f"{q['diff']:+.2f} | {q['se']:.2f} | {q['p']:.2g} |")
    if means:
        lines += ["", "| mixed plan, mean over seeds | seeds | difference ONNX (points) | image se | seed sd "
                  "| difference fake-quant (points) |", "|" + "---|" * 6]
        for q in means:
            fq = "" if q["fq_diff"] is None else f"{q['fq_diff']:+.2f}"
            lines.append(f"| {q['label']} | {', '.join(map(str, q['seeds']))} | {q['diff']:+.2f} | "
                         f"{q['se_images']:.2f} | {q['sd_seeds']:.2f} | {fq} |")
    return "\n".join(lines)


def write_paired(rows: list[dict], spec: str, out: str, threads: int) -> list[dict]:
    """The paired comparison of a run's rows, written to OUT/paired.md (and returned for results.json)."""
    from mpqc.compiler.data import load_data

    ds = load_data(spec, seed=0).val  # the test split does not depend on the seed
    hits: dict = {}
    pairs = paired_rows(rows, ds, threads, hits)
    if pairs:
        table = fmt_paired(pairs, seed_means(pairs, hits))
        _write_atomic(os.path.join(out, "paired.md"), table + "\n")
        print(table)
    return pairs


def plot(rows: list[dict], fp_row: dict, out: str) -> list[str]:
    """Accuracy against BitOPs and against weight size: uniform vs mpqc (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error") and r.get("acc_fq") is not None]
    paths = []
    for xkey, xlabel, fname, scale in (("bitops", "GBitOPs", "cifar_bitops.png", 1e9),
                                       ("size", "weight size (KB, 1 KB = 1024 bytes)", "cifar_size.png", 1024)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        alphas = sorted({_alpha(r.get("weight_alpha")) for r in ok if r["group"] == "mixed_alpha"} - {"None"})
        measured = sorted({f"{r['alpha_used']:.2g}" for r in ok if r["group"] == "mixed_auto" and r.get("alpha_used")})
        groups = (("uniform", "o-", "uniform (LSQ QAT)"), ("mixed", "s-", "mpqc mixed (fisher, layer)"),
                  ("mixed_alpha", "s--", "mpqc mixed (fisher, layer), weight-alpha "
                   + "/".join(alphas)),
                  ("mixed_auto", "s:", "mpqc mixed (fisher, layer), weight-alpha auto (measured "
                   + "/".join(measured) + ")"),
                  ("kernel", "D", "mpqc kernel-wise"), ("memory", "^", "mpqc at Uhlich memory target"),
                  ("methods", "x", "mpqc, other sensitivity methods"), ("ablation", "v", "mpqc, ends fixed at 8"))
        for group, style, name in groups:
            pts = sorted((r[xkey] / scale, r["acc_fq"], r["label"]) for r in ok if r["group"] == group and r[xkey])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.axhline(fp_row["acc"], color="gray", ls="--", lw=1, label=f"FP32 {fp_row['acc']:.2f} %")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CIFAR-10 top-1 (%), fake-quant")
        ax.set_title("ResNet-20: mixed precision vs uniform")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _write_atomic(path: str, text: str) -> None:
    """Write through a temp file beside ``path`` and rename: a killed merge leaves the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load_runs(dirs: list[str], option: str) -> list[dict]:
    """Every run's results.json, all checked before any work: a bad one is a one-line error (exit 2)."""
    runs = []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            _bad(f"{option} {d}: no results.json there (run the bench with --out {d} first)")
        try:
            with open(path) as f:
                run = json.load(f)
        except ValueError as e:
            _bad(f"{option} {d}: results.json is not valid JSON ({e}); re-run the bench with --out {d}")
        if not isinstance(run, dict) or not isinstance(run.get("rows"), list) or "fp" not in run:
            _bad(f"{option} {d}: results.json has no 'fp' row and 'rows' list; it is not this bench's output")
        runs.append(run)
    return runs


def _run_spec(run: dict, d: str, option: str) -> str:
    """The data spec a run's compiles used (recorded since session 11; rebuilt from its arguments before)."""
    meta = run.get("meta", {})
    if meta.get("spec"):
        return meta["spec"]
    args = meta.get("args", {})
    if "data" not in args:
        _bad(f"{option} {d}: results.json does not say which data the run used; re-run the bench")
    data = os.path.join(args["out"], "data") if args.get("train_limit") else os.path.abspath(args["data"])
    return f"cifar10:{data}"


def _data_key(run: dict, d: str, option: str) -> str:
    """What makes two runs' data the same: the spec, or for a --train-limit run the source and the limits (each
    such run writes its own identical copy, OUT/data, so the specs differ)."""
    args = run.get("meta", {}).get("args", {})
    if args.get("train_limit"):
        n = int(args["train_limit"])
        return (f"cifar10:{os.path.normpath(args['data'])} (first {n} training images, "
                f"{args.get('test_limit') or max(1, n // 5)} test images)")
    return _run_spec(run, d, option)


def merge(dirs: list[str], out: str) -> int:
    """One table and one pair of plots from several runs on the same FP model (e.g. a weight-alpha variant)."""
    runs = _load_runs(dirs, "--merge")
    fp_row = runs[0]["fp"]
    specs = {_data_key(run, d, "--merge") for d, run in zip(dirs, runs)}
    if len(specs) > 1:
        _bad(f"--merge: the runs used different data ({', '.join(sorted(specs))}); merge runs on one data set only")
    rows = []
    for run in runs:
        alpha = run.get("meta", {}).get("args", {}).get("weight_alpha", 1.0)
        seed = run.get("meta", {}).get("args", {}).get("seed") or 0
        for r in run["rows"]:
            r = {"seed": seed, **r}  # paired comparisons match a mixed row with the uniform row of its seed
            if r.get("group") == "lr-sweep":
                continue
            if alpha != 1.0 and r.get("group") == "mixed":  # a run from before the group was set at launch
                r = {**r, "group": "mixed_alpha", "weight_alpha": alpha}
            if r.get("weight_alpha") == "auto" and r.get("group") == "mixed_alpha":
                r = {**r, "group": "mixed_auto"}
            rows.append(r)
    os.makedirs(out, exist_ok=True)
    table = fmt_table(fp_row, rows)
    _write_atomic(os.path.join(out, "table.md"), table + "\n")
    _write_atomic(os.path.join(out, "results.json"),
                  json.dumps({"meta": {"merged": dirs, "spec": _run_spec(runs[0], dirs[0], "--merge")}, "fp": fp_row,
                              "rows": rows}, indent=1,
                             default=str))
    plot(rows, fp_row, out)
    print(table)
    return 0


def paired(dirs: list[str]) -> int:
    """Add the paired comparison to finished runs (results.json gets meta.paired, and OUT/paired.md)."""
    for d, run in zip(dirs, _load_runs(dirs, "--paired")):
        meta = run.setdefault("meta", {})
        spec = _run_spec(run, d, "--paired")
        meta["paired"] = write_paired(run["rows"], spec, d, os.cpu_count() or 1)
        if not meta["paired"]:
            print(f"{d}: no mixed row with a uniform row of the same plan and both exports present", file=sys.stderr)
        _write_atomic(os.path.join(d, "results.json"), json.dumps(run, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--train-limit", type=int, default=None, help="reduced run: first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="with --train-limit: test images (default N // 5)")
    p.add_argument("--fp-model", default=None, help="reuse this trained ResNet-20 state dict (skips training)")
    p.add_argument("--fp-epochs", type=int, default=100)
    p.add_argument("--fp-lr", type=float, default=0.2)
    p.add_argument("--qat-epochs", type=int, default=15)
    p.add_argument("--qat-lrs", default="0.02,0.01,0.005,adam:1e-4",
                   help="QAT settings tried on uniform W2A4, LR or OPTIMIZER:LR (sgd, adam, adamw); the best is used")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=1, help="compiles run at once (separate processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per compile (default cores / jobs)")
    p.add_argument("--deadline", type=float, default=None, help="start no compile after this many seconds")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "cifar"))
    p.add_argument("--plans", default="w2a4,w3a3,w2a2,w4a4,w8a8")
    p.add_argument("--methods", default="hutchinson,impq,eval,limpq",
                   help="other sensitivity methods compared at the W2A4 BitOPs")
    p.add_argument("--sensitivity", default=None, metavar="METHOD",
                   help="mixed rows that use fisher (the default) use this method instead, e.g. hutchinson or impq")
    p.add_argument("--rows", default=None, help="only these job keys (e.g. w2a4_uniform,w2a4_mixed; the lr sweep's "
                                                "are w2a4_uniform_sgd0.01 and so on)")
    p.add_argument("--no-extra", action="store_true", help="uniform and fisher layer-wise mixed rows only")
    p.add_argument("--target", default="generic")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="only combine these runs' results.json (FP row of the first) into one table and plots in --out")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--weight-alpha", default="1",
                   help="mixed rows: the search's weight-score factor (objective = act scores + A x weight scores), "
                        "or auto (measured by probe fine-tunings, see --probe-steps)")
    p.add_argument("--probe-steps", type=int, default=100, help="--weight-alpha auto: batches per probe")
    p.add_argument("--deploy-tail", type=float, default=0.0,
                   help="every compile: last fraction of the QAT steps on the exported form (0 = off)")
    p.add_argument("--residual-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="every compile: fine-tune with the export's 8-bit residual-add quantizers (default on)")
    p.add_argument("--seed", type=int, default=0,
                   help="every compile: calibration samples, sensitivity batches and fine-tuning order")
    p.add_argument("--paired", nargs="+", default=None, metavar="DIR",
                   help="only add the image-by-image mixed-vs-uniform comparison (ONNX) to these finished runs")
    args = p.parse_args(argv)
    t_start = time.time()
    if args.merge:
        return merge(args.merge, args.out)
    if args.paired:
        return paired(args.paired)
    from mpqc.commands.search import weight_alpha_arg

    try:
        args.weight_alpha = weight_alpha_arg(args.weight_alpha)
    except argparse.ArgumentTypeError as e:
        _bad(f"--weight-alpha {e} (1 = the search's default)")
    if args.seed < 0:
        _bad(f"--seed {args.seed} must be >= 0")
    from mpqc.compiler.sensitivity import METHODS

    if args.sensitivity is not None and args.sensitivity not in METHODS:
        _bad(f"--sensitivity {args.sensitivity!r} is not a method; use one of {', '.join(sorted(METHODS))}")
    if args.probe_steps < 1:
        _bad(f"--probe-steps {args.probe_steps} must be >= 1")
    if not 0 <= args.deploy_tail < 1:
        _bad(f"--deploy-tail {args.deploy_tail} must be a fraction in [0, 1)")
    deadline = t_start + args.deadline if args.deadline else float("inf")
    plans = [parse_plan(t) for t in args.plans.split(",") if t.strip()]
    settings = [parse_setting(v) for v in args.qat_lrs.split(",") if v.strip()]  # checked before any work
    if not plans or not settings:
        _bad("--plans and --qat-lrs need at least one entry each")
    if args.fp_model and not os.path.isfile(args.fp_model):
        _bad(f"--fp-model {args.fp_model}: file not found")
    os.makedirs(args.out, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the workers inherit it

    from mpqc.compiler.data import load_data

    data_dir = os.path.abspath(args.data)
    if args.train_limit:
        data_dir = reduced_data(data_dir, os.path.join(args.out, "data"), args.train_limit,
                                args.test_limit or max(1, args.train_limit // 5))
    spec = f"cifar10:{data_dir}"
    data = load_data(spec, seed=0)  # the same spec and seed mpqc.compile uses: same split and normalisation
    print(f"data {spec}: train {len(data.train)}, test {len(data.val)}", flush=True)

    from mpqc.compiler.train import evaluate
    from mpqc.compiler.zoo import resnet20

    device = torch.device(args.device)
    model_path = os.path.join(args.out, "resnet20_fp.pt")
    if args.fp_model:
        model = resnet20()
        model.load_state_dict(torch.load(args.fp_model, map_location="cpu", weights_only=True))
        model.eval()
        train_s = float("nan")
        if os.path.abspath(args.fp_model) != os.path.abspath(model_path):
            torch.save(model.state_dict(), model_path)
    else:
        model, train_s = train_fp(data, epochs=args.fp_epochs, lr=args.fp_lr, batch_size=args.batch_size,
                                  wd=args.wd, device=device)
        torch.save(model.state_dict(), model_path)
    fp_acc = evaluate(model, data.val)
    with open(os.path.join(args.out, "fp.done"), "w") as f:  # other benches wait for the trained model
        f.write(f"{fp_acc:.2f}\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FP ResNet-20: {fp_acc:.2f} % ({n_params} parameters, {train_s:.0f} s)", flush=True)
    from mpqc.compiler.capture import capture

    macs = capture(resnet20().eval(), (torch.zeros(1, 3, 32, 32),), fold_bn=True).graph.total_macs()
    fp_row = {"acc": fp_acc, "train_s": train_s, "gbitops": macs * 32 * 32 / 1e9, "kb": n_params * 4 / 1024,
              "params": n_params, "macs": macs}

    common = {"model": model_path, "arch": ARCH, "target": args.target, "spec": spec, "out": args.out,
              "qat_epochs": args.qat_epochs, "batch_size": args.batch_size, "samples": args.samples,
              "device": args.device, "threads": threads, "weight_alpha": args.weight_alpha,
              "probe_steps": args.probe_steps, "deploy_tail": args.deploy_tail,
              "residual_quant": args.residual_quant, "seed": args.seed}
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "threads_per_job": threads,
            "args": vars(args), "spec": spec, "train": len(data.train), "test": len(data.val),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows: list[dict] = []

    def save(_row=None):
        if _row is not None:
            print(f"  done {_row['key']}: fake-quant {_row.get('acc_fq')}, ONNX {_row.get('acc_onnx')}, "
                  f"bitops {_row.get('bitops')}, size {_row.get('size')}, wall {_row.get('wall_s')}, "
                  f"error {_row.get('error')}", flush=True)
        _write_atomic(os.path.join(args.out, "results.json"),
                      json.dumps({"meta": meta, "fp": fp_row, "rows": rows}, indent=1, default=str))

    save()  # the float row is on record before any compile: a run stopped mid-way still has it
    keep = set(args.rows.split(",")) if args.rows else None
    opt, lr = settings[0]
    sweep = sweep_jobs(settings, plans, keep, args.seed)
    if sweep:
        swept = run_jobs(sweep, common, args.jobs, deadline, lambda r: (rows.append(r), save(r)))
        good = [r for r in swept if r.get("acc_fq") is not None]
        if good:
            best = max(good, key=lambda r: r["acc_fq"])
            opt, lr = best["opt"], best["lr"]
            meta["lr_selected"] = {"optimizer": opt, "lr": lr, "by": "uniform W2A4 fake-quant test accuracy",
                                   "sweep": {f"{r['opt']}:{r['lr']:g}": r.get("acc_fq") for r in swept}}
            print(f"QAT {opt} lr {lr:g} (uniform W2A4 {best['acc_fq']:.2f} %)", flush=True)
    methods = [m for m in args.methods.split(",") if m.strip()]
    from mpqc.compiler.zoo import resnet20 as arch_fn

    bitops_cache: dict = {}

    def bitops_of(w, a):
        if (w, a) not in bitops_cache:
            bitops_cache[(w, a)] = uniform_bitops(arch_fn, w, a, target=args.target)
        return bitops_cache[(w, a)]

    jobs = make_jobs(plans, lr, methods, not args.no_extra, bitops_of, opt)
    if args.weight_alpha != 1.0:
        for j in jobs:
            if not j["uniform"]:
                for g in (", layer)", ", kernel-wise)"):  # every mixed row uses it, so every label says so
                    j["label"] = j["label"].replace(g, f"{g[:-1]}, weight-alpha {_alpha(args.weight_alpha)})")
                j["weight_alpha"] = args.weight_alpha
                if j["group"] == "mixed":
                    j["group"] = "mixed_auto" if args.weight_alpha == "auto" else "mixed_alpha"
    if args.sensitivity:
        jobs = with_method(jobs, args.sensitivity)
    for r in list(rows):  # the sweep's run at the chosen setting is the uniform W2A4 row
        if r.get("group") == "lr-sweep" and (r["opt"], r["lr"]) == (opt, lr) and not r.get("error"):
            rows.append({**r, "key": "w2a4_uniform", "label": "W2A4 uniform (LSQ QAT)", "group": "uniform"})
            jobs = [j for j in jobs if j["key"] != "w2a4_uniform"]
    for j in jobs:
        j["seed"] = args.seed
        if args.seed:
            j["label"] += f" [seed {args.seed}]"
    if keep is not None:
        jobs = [j for j in jobs if j["key"] in keep]
    run_jobs(jobs, common, args.jobs, deadline, lambda r: (rows.append(r), save(r)))
    try:
        meta["paired"] = write_paired(rows, spec, args.out, threads * max(1, args.jobs))
    except Exception:  # noqa: BLE001 - the table matters more than the comparison
        traceback.print_exc()
    save()
    final = [r for r in rows if r.get("group") != "lr-sweep"]
    sweep_rows = [r for r in rows if r.get("group") == "lr-sweep"]
    table = fmt_table(fp_row, final + sweep_rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    try:
        plot(final, fp_row, args.out)
    except Exception:  # noqa: BLE001 - the table matters more than the plot
        traceback.print_exc()
    print(table)
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    failed = [r["key"] for r in rows if r.get("error") and not str(r["error"]).startswith("not run")]
    if failed:  # the table keeps them; the exit status tells a launching script
        print(f"rows failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
