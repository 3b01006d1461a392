"""Time every sensitivity method on torchvision ResNet-50 with 512 samples; writes its section of bench/RESULTS.md.

The model is a random-init ResNet-50 captured with BN folded (the scores of a random network mean nothing, the
time is what is measured); the data are the 250 ImageNet sample images of shared/data (``--data imagenet``;
tiled with horizontal flips up to ``--samples``) or Gaussian noise (``--data random``), resized to
``--resolution``. Capture, quantizer insertion and activation calibration are timed once, apart; each method
then runs from the same calibrated model (``run_sensitivity``, no cache) with its default options unless
``--option method.key=value`` says otherwise. The target for the default method (fisher) is <= 30 s on an H100
at 224x224 with 512 samples.

    python bench/bench_sensitivity.py --device cuda --resolution 224 --samples 512 --write      # the GPU run
    python bench/bench_sensitivity.py --device cpu --resolution 32 --samples 512 --write         # 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_sensitivity:start -->", "<!-- bench_sensitivity:end -->"
METHODS = ("fisher", "hutchinson", "impq", "eval", "limpq", "dual", "analog")


def make_data(kind: str, n: int, res: int, seed: int = 0):
    from mpqc.compiler.data import DataSplits

    if kind == "imagenet":
        path = ROOT.parent / "shared" / "data" / "imagenet-samples" / "samples.npz"
        if not path.exists():
            path = Path("/work/shared/data/imagenet-samples/samples.npz")
        with np.load(path) as z:
            x = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float() / 255.0
            y = torch.from_numpy(z["y"]).long()
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        x = (x - mean) / std
        reps = -(-n // len(x))
        x = torch.cat([x if i % 2 == 0 else x.flip(-1) for i in range(reps)])[:n]
        y = y.repeat(reps)[:n]
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, res, res, generator=g)
        y = torch.randint(0, 1000, (n,), generator=g)
    ds = TensorDataset(x.contiguous(), y)
    return DataSplits(f"{kind}{res}", ds, ds, ds, 1000)


def parse_options(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = value
    return out


def run(args) -> dict:
    import torchvision

    from mpqc.compiler.capture import capture
    from mpqc.compiler.quantize import QuantizedModel
    from mpqc.compiler.sensitivity import run_sensitivity

    torch.manual_seed(0)
    device = torch.device(args.device)
    data = make_data(args.data, args.samples, args.resolution)
    model = torchvision.models.resnet50().eval()
    t0 = time.perf_counter()
    cap = capture(model, (data.calib.tensors[0][:2],), fold_bn=True)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    qm = QuantizedModel(cap)
    calib = [(data.calib.tensors[0][i:i + args.batch_size],) for i in range(0, args.samples, args.batch_size)]
    qm.calibrate(calib, max_batches=len(calib))
    t_calib = time.perf_counter() - t0
    # the weight quantizers' MSE step search (compiler/quantize.py) at every candidate, once per model: the
    # methods that run in place on this model reuse its cache (dual re-fits its own trained copy)
    cands = tuple(int(b) for b in args.candidates.split(","))
    t0 = time.perf_counter()
    for op in qm.graph_ir.weighted_layers():
        for b in cands:
            qm.set_precision(op.name, w_bits=b)
        qm.set_precision(op.name, w_bits=None)
    t_steps = time.perf_counter() - t0
    if device.type == "cuda":
        qm.to(device)
    opts = parse_options(args.option)
    rows = []
    for method in args.methods.split(","):
        extra = {"target": "analog"} if method == "analog" else {}
        o = {"candidates": tuple(int(b) for b in args.candidates.split(",")), "samples": args.samples,
             "batch_size": args.batch_size, "device": args.device, **extra, **opts.get(method, {})}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        table = run_sensitivity(method, qm, data, o)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        keep = ("probes", "per_sample", "form", "epochs", "steps", "metric", "cone")
        rows.append({"method": method, "wall_s": round(wall, 2), "method_s": table.meta.get("time_s"),
                     "peak_gib": None if peak is None else round(peak, 2),
                     "options": {k: v for k, v in opts.get(method, {}).items()},
                     "meta": {**{k: table.meta[k] for k in keep if k in table.meta},
                              **({"isolated": len(table.meta["isolated"])} if "isolated" in table.meta else {})}})
        print(f"{method:11s} {wall:8.2f} s  {rows[-1]['meta']}", flush=True)
    return {"device": device_name(device), "resolution": args.resolution, "samples": args.samples,
            "batch_size": args.batch_size, "data": args.data, "candidates": args.candidates,
            "capture_s": round(t_capture, 2), "calibrate_s": round(t_calib, 2), "steps_s": round(t_steps, 2),
            "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg_1min": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core CPU ({cpu})"


def section(res: dict, label: str) -> str:
    lines = [START, "## Sensitivity: time per method", "",
             f"**{label}** — torchvision ResNet-50 (random init, BN folded: 54 conv/linear layers, 54 activation "
             f"groups), {res['samples']} samples of {res['data']} data at {res['resolution']}x{res['resolution']}, "
             f"batch {res['batch_size']}, candidates {res['candidates']}; {res['device']}, torch {res['torch']} "
             f"({res['threads']} threads), {res['date']}, 1-min load average {res['loadavg_1min']} at the end "
             "(the machine is shared with other engineers' jobs: wall times are upper bounds). Each method runs "
             "with its default options from the same calibrated model "
             f"(capture {res['capture_s']} s, quantizer insertion + calibration {res['calibrate_s']} s, and the "
             f"weight quantizers' MSE step-size search at every candidate {res['steps_s']} s, done once per model "
             "and reused by the methods that run in place; not counted below).",
             "", "| method | wall s | method s | what ran |", "|---|---|---|---|"]
    for r in res["rows"]:
        what = ", ".join(f"{k}={v}" for k, v in {**r["meta"], **r["options"]}.items())
        peak = f", peak {r['peak_gib']} GiB" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['method']} | {r['wall_s']} | {r['method_s']} | {what}{peak} |")
    lines += ["", "Cost structure (what scales with what): fisher = one batch backward + per-sample weight gradients "
              "(torch.func.vmap, chunks of 32) per batch, all candidates in one einsum; hutchinson = two double "
              "backwards per probe, weights and activations apart (probe k reads batch k mod n_batches; stops at "
              "`probes` or when every group's relative standard error < `tol`), then one per isolated probe of each "
              "group whose trace is within two standard errors of zero; impq = per-sample Jacobians of the 4 "
              "competitor margins; eval = "
              "one downstream-cone re-run per (group, candidate, batch); limpq = (candidates + 1) forward/backward "
              "passes per step; dual = per candidate bit-width and epoch, one HP step + one LP interpreter pass "
              "per batch; analog = one backward.", "",
              "GPU run (pending; target for fisher: <= 30 s on an H100):", "```",
              "python bench/bench_sensitivity.py --device cuda --resolution 224 --samples 512 --batch-size 64 --write",
              "```", END]
    return "\n".join(lines)


def write(text: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# mpqc benchmark results\n"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default="imagenet", choices=("imagenet", "random"))
    p.add_argument("--candidates", default="8,6,5,4,3,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument("--label", default=None, help="how to label the run in RESULTS.md")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    label = args.label or ("GPU run" if args.device.startswith("cuda") else
                           f"CPU stand-in, reduced resolution ({args.resolution}x{args.resolution}); no GPU in this "
                           "session")
    text = section(res, label)
    print(text)
    if args.write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
