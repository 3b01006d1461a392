"""How fast LSQ fine-tuning recovers a low-bit ResNet-20 from calibration, per optimizer / lr / batch statistics.

A short CPU probe (one epoch on a 10,000-image subset, 2,000 test images) that compares fine-tuning settings on the
BN-folded graph before spending GPU time on 15-epoch runs; it shows early recovery, not final accuracy.

    python bench/probe_qat.py --model RESNET20_FP.pt sgd:0.001:0 sgd:0.01:0 sgd:0.01:1 adam:1e-4:0

Each setting is OPTIMIZER:LR:BATCH_STATS (1 = batch statistics on, see compiler/finetune/renorm.py).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from mpqc.compiler.capture import capture
    from mpqc.compiler.data import DataSplits, load_data
    from mpqc.compiler.finetune import FinetuneConfig, finetune, prepare
    from mpqc.compiler.loading import load_model
    from mpqc.compiler.quantize import LayerQuant
    from mpqc.compiler.train import evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+", help="OPTIMIZER:LR:BATCH_STATS, e.g. sgd:0.01:1")
    p.add_argument("--model", required=True, help="a ResNet-20 state dict (mpqc.compiler.zoo:resnet20)")
    p.add_argument("--data", default=f"cifar10:{ROOT.parent / 'shared' / 'data' / 'cifar10'}")
    p.add_argument("--bits", default="2,4", help="W,A of every layer but conv1 and fc (8 bits)")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, a = (int(v) for v in args.bits.split(","))
    full = load_data(args.data, seed=0)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(full.train), generator=g)[: args.train]
    te = torch.randperm(len(full.val), generator=g)[: args.test]
    data = DataSplits(full.name, TensorDataset(*(t[tr] for t in full.train.tensors)), full.calib,
                      TensorDataset(*(t[te] for t in full.val.tensors)), full.num_classes, full.augment)
    m = load_model(args.model, arch="mpqc.compiler.zoo:resnet20")
    print(f"float: {evaluate(m.module, data.val):.2f} % on {len(te)} test images", flush=True)
    cap = capture(copy.deepcopy(m.module), m.example_inputs, fold_bn=True)
    assign = {op.name: LayerQuant(8, 8) if op.name in ("conv1", "fc") else LayerQuant(w, a)
              for op in cap.graph.layers()}
    print("| setting | after calibration (%) | after one epoch (%) | seconds |\n|---|---|---|---|", flush=True)
    for spec in args.settings:
        opt, lr, bs = (spec.split(":") + ["1"])[:3]
        cfg = FinetuneConfig(epochs=1, lr=float(lr), optimizer=opt, batch_size=256, checkpoint_dir=None, device="cpu",
                             batch_stats=bs == "1", eval_batch_size=500)
        q = prepare(copy.deepcopy(cap), assign, data, cfg)
        before = evaluate(q, data.val)
        t = time.perf_counter()
        r = finetune(q, m.module, data, cfg, progress=False)
        print(f"| {spec} | {before:.2f} | {r.final_accuracy:.2f} | {time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
