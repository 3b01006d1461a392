"""CIFAR-10 ResNet-20 end to end (issue 9): full-precision training, uniform LSQ QAT baselines and mpqc mixed
precision at the same BitOPs, with each compile stage's time from its manifest.

Steps: (1) train ResNet-20 (option-A shortcuts, ``mpqc.compiler.zoo:resnet20``) in full precision with the fast
recipe (SGD nesterov, lr 0.2 cosine, batch 256, wd 5e-4, per-sample random crops and flips; bf16 autocast and
channels-last on CUDA only) and save its state dict; (2) for each uniform baseline WxAy (first conv and fc fixed at
8 bits) run ``mpqc.compile`` forced to uniform precision (every ``layer*`` fixed at WxAy, candidates {x, y}) and
``mpqc.compile`` with mixed precision at the same BitOPs (``avg_bits=WxAy``, the target's default candidates);
(3) read accuracy, BitOPs, weight size and the time of each stage from OUT/*/manifest.json; (4) print a markdown
table (also written to OUT/table.md, and the raw rows to OUT/results.json).

    # the GPU run (full recipe of issue 9)
    python bench/bench_cifar.py --device cuda --fp-epochs 100 --qat-epochs 15 \
        --plans w8a8,w4a4,w3a3,w2a4 --out bench_out/cifar
    # reduced CPU pipeline check (numbers not comparable to the papers)
    python bench/bench_cifar.py --device cpu --train-limit 5000 --fp-epochs 3 --qat-epochs 1 \
        --plans w4a4,w2a4 --out /tmp/cifar_cpu

``--train-limit N`` writes a reduced copy of the data to OUT/data (the first N training images of the shuffled
shards and a random, seed-0 subset of N // 5 test images; the stored test split is sorted by label, so a
"first N" test subset would hold one class only) and hands that directory to mpqc.compile, which reads the
whole ``cifar10:DIR`` it is given. Without it the shards in ``--data`` are used as they are (50,000 / 10,000).
Note: mpqc.compile picks CUDA for fine-tuning when available (FinetuneConfig.device="auto"); capture, sensitivity,
export and evaluation run where mpqc puts them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
ARCH = "mpqc.compiler.zoo:resnet20"
STAGES = ("capture", "sensitivity", "search", "finetune", "export")


def parse_plan(text: str) -> tuple[int, int]:
    t = text.strip().lower()
    if not (t.startswith("w") and "a" in t):
        raise SystemExit(f"--plans: {text!r} is not of the form wXaY (e.g. w2a4)")
    w, a = t[1:].split("a", 1)
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


def train_fp(data, *, epochs: int, lr: float, batch_size: int, wd: float, device: torch.device, seed: int = 0):
    """The documented fast recipe; bf16 autocast and channels-last only on CUDA."""
    from mpqc.compiler.data import augment_batch, make_loader
    from mpqc.compiler.zoo import resnet20

    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    model = resnet20().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            x = augment_batch(x, data.augment, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        print(f"  fp epoch {epoch + 1}/{epochs}: loss {total / max(1, len(loader)):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return model, train_s


@torch.no_grad()
def accuracy(model, ds) -> float:
    from mpqc.compiler.train import evaluate

    return evaluate(model, ds)


def _cost(costs: dict, key: str):
    v = costs.get(key)
    return v.get("value") if isinstance(v, dict) else v


def run_compile(model_path: str, data_spec: str, out: str, *, w: int, a: int, uniform: bool, args) -> dict:
    import mpqc

    fix = ["conv1=8", "fc=8"]
    kw = dict(avg_bits=f"W{w}A{a}", fix=tuple(fix), epochs=args.qat_epochs, lr=args.qat_lr,
              batch_size=args.batch_size, sensitivity=args.sensitivity, granularity=args.granularity,
              samples=args.samples, progress=False)
    if uniform:  # every searchable layer fixed at WxAy: the search has nothing to choose
        kw["fix"] = (f"layer*=W{w}A{a}", *fix)
        kw["candidates"] = ",".join(str(b) for b in sorted({w, a}, reverse=True))
    t0 = time.perf_counter()
    res = mpqc.compile(model_path, arch=ARCH, target=args.target, data=data_spec, out=out, **kw)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    acc = res.metrics.get("accuracy", {})
    costs = res.metrics.get("costs", {})
    return {"name": f"W{w}A{a} {'uniform (LSQ QAT)' if uniform else 'mpqc mixed'}", "out": out,
            "acc_fq": acc.get("fake-quant (PyTorch)"), "acc_onnx": acc.get("exported ONNX (onnxruntime)"),
            "acc_fp": acc.get("full precision"), "bitops": _cost(costs, "bitops"), "size": _cost(costs, "size"),
            "times": {s: stages.get(s, {}).get("time_s") for s in STAGES}, "wall_s": wall}


def fmt_table(fp_row: dict, rows: list[dict]) -> str:
    head = ("| model | top-1 fake-quant (%) | top-1 ONNX (%) | GBitOPs | weights (KB) | capture s | sensitivity s "
            "| search s | finetune s | export s |")
    lines = [head, "|" + "---|" * 10]
    lines.append(f"| FP32 ResNet-20 | {fp_row['acc']:.2f} | - | {fp_row['gbitops']:.3f} | {fp_row['kb']:.1f} "
                 f"| train {fp_row['train_s']:.0f} s | | | | |")

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        t = r["times"]
        lines.append(f"| {r['name']} | {f(r['acc_fq'], '.2f')} | {f(r['acc_onnx'], '.2f')} | "
                     f"{f(None if r['bitops'] is None else r['bitops'] / 1e9, '.4f')} | "
                     f"{f(None if r['size'] is None else r['size'] / 1e3, '.1f')} | "
                     + " | ".join(f(t[s], '.1f') for s in STAGES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--train-limit", type=int, default=None, help="reduced run: first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="with --train-limit: test images (default N // 5)")
    p.add_argument("--fp-epochs", type=int, default=100)
    p.add_argument("--fp-lr", type=float, default=0.2)
    p.add_argument("--qat-epochs", type=int, default=15)
    p.add_argument("--qat-lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "cifar"))
    p.add_argument("--plans", default="w8a8,w4a4,w3a3,w2a4")
    p.add_argument("--target", default="generic")
    p.add_argument("--sensitivity", default="fisher")
    p.add_argument("--granularity", default="layer")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--no-mixed", action="store_true", help="uniform baselines only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plans = [parse_plan(t) for t in args.plans.split(",") if t.strip()]
    os.makedirs(args.out, exist_ok=True)

    from mpqc.compiler.data import load_data

    data_dir = os.path.abspath(args.data)
    if args.train_limit:
        data_dir = reduced_data(data_dir, os.path.join(args.out, "data"), args.train_limit,
                                args.test_limit or max(1, args.train_limit // 5))
    spec = f"cifar10:{data_dir}"
    data = load_data(spec, seed=0)  # the same spec and seed mpqc.compile uses: same split and normalisation
    print(f"data {spec}: train {len(data.train)}, test {len(data.val)}", flush=True)

    device = torch.device(args.device)
    model_path = os.path.join(args.out, "resnet20_fp.pt")
    model, train_s = train_fp(data, epochs=args.fp_epochs, lr=args.fp_lr, batch_size=args.batch_size,
                              wd=args.wd, device=device)
    torch.save(model.state_dict(), model_path)
    fp_acc = accuracy(model, data.val)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FP ResNet-20: {fp_acc:.2f} % ({n_params} parameters, {train_s:.0f} s)", flush=True)

    rows = []
    for w, a in plans:
        for uniform in (True, False) if not args.no_mixed else (True,):
            out = os.path.join(args.out, f"w{w}a{a}_{'uniform' if uniform else 'mpqc'}")
            print(f"compile W{w}A{a} {'uniform' if uniform else 'mixed'} -> {out}", flush=True)
            try:
                r = run_compile(model_path, spec, out, w=w, a=a, uniform=uniform, args=args)
            except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                import traceback

                traceback.print_exc()
                r = {"name": f"W{w}A{a} {'uniform' if uniform else 'mpqc mixed'} FAILED: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}",
                     "acc_fq": None, "acc_onnx": None, "bitops": None, "size": None,
                     "times": dict.fromkeys(STAGES), "wall_s": None}
            print("  ", {k: r[k] for k in ("acc_fq", "acc_onnx", "bitops", "size", "times")}, flush=True)
            rows.append(r)

    macs = None
    for r in rows:
        if r.get("out") and os.path.exists(os.path.join(r["out"], "manifest.json")):
            with open(os.path.join(r["out"], "manifest.json")) as f:
                macs = json.load(f)["stages"]["capture"]["info"].get("total_macs")
            break
    fp_row = {"acc": fp_acc, "train_s": train_s, "gbitops": (macs or 0) * 32 * 32 / 1e9,
              "kb": n_params * 4 / 1e3}
    table = fmt_table(fp_row, rows)
    meta = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "args": vars(args), "train": len(data.train), "test": len(data.val)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "fp": fp_row, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
