"""Time one ResNet-20 training step (batch 256, CIFAR shape) in each memory format and precision, same run.

Why: the CPU variant of the CIFAR-10 benchmark spends most of its hour training the float model; this measures
what ``train_float(channels_last=True)`` buys there (bench_cifar passes it on every device). Each mode runs
``--warmup`` untimed and ``--steps`` timed SGD steps of the same random batch from the same seed; the table gives
the median step time and the ratio to the contiguous fp32 step measured in the same run.

    python bench/bench_train_step.py --device cpu --threads 2 --steps 8

``--qat`` times mpqc's LSQ fine-tuning step instead (``finetune`` on a W3A3 ResNet-20, conv1 and fc at W8A8, batch
256, the per-conv batch statistics of compiler/finetune/renorm.py on): the fused ``BatchRenorm`` training path
against its explicit mean / var / normalise / affine chain (``BatchRenorm.explicit``, what it was before session
19), and with batch statistics off, all in the same run. Step times come from the fine-tuning loop's step callback.

    python bench/bench_train_step.py --qat --device cpu --threads 2 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

MODES = {"fp32": (False, False), "fp32 channels-last": (True, False), "bf16 autocast": (False, True),
         "bf16 autocast channels-last": (True, True)}


def step_times(device: torch.device, channels_last: bool, bf16: bool, steps: int, warmup: int) -> list[float]:
    from mpqc.compiler.zoo import resnet20

    torch.manual_seed(0)
    model = resnet20().to(device).train()
    x = torch.randn(256, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def qat_step_times(device: torch.device, renorm: str, steps: int, warmup: int) -> list[float]:
    """Seconds per fine-tuning step; ``renorm`` is "fused", "explicit" or "off" (no batch statistics)."""
    import copy

    from torch.utils.data import TensorDataset

    from mpqc.compiler.capture import capture
    from mpqc.compiler.data import DataSplits
    from mpqc.compiler.finetune import FinetuneConfig, finetune, prepare
    from mpqc.compiler.finetune.renorm import BatchRenorm
    from mpqc.compiler.quantize import LayerQuant
    from mpqc.compiler.zoo import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()
    n = 256 * (warmup + steps)
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    few = TensorDataset(x[:256], y[:256])
    data = DataSplits("random", TensorDataset(x, y), few, few, 10, None)
    cap = capture(copy.deepcopy(model), (torch.randn(1, 3, 32, 32),), fold_bn=True)
    assign = {op.name: LayerQuant(8, 8) if op.name in ("conv1", "fc") else LayerQuant(3, 3)
              for op in cap.graph.layers()}
    cfg = FinetuneConfig(epochs=1, lr=0.02, batch_size=256, checkpoint_dir=None, device=str(device),
                         batch_stats=renorm != "off")
    q = prepare(cap, assign, data, cfg)
    stamps = [time.perf_counter()]

    def step(event, info):
        if event == "step":  # the loop turned the loss into a float first: the device has finished the step
            stamps.append(time.perf_counter())

    fused = BatchRenorm.forward
    if renorm == "explicit":
        BatchRenorm.forward = lambda self, z: self.explicit(z) if self.training else fused(self, z)
    try:
        finetune(q, model, data, cfg, progress=False, callback=step)
    finally:
        BatchRenorm.forward = fused
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--qat", action="store_true", help="time mpqc's LSQ fine-tuning step (see the docstring)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.threads} threads, {device}")
    if a.qat:
        print("| fine-tuning step (W3A3 ResNet-20, batch 256) | median s/step | ratio to explicit | s per epoch "
              "(195 steps) |")
        print("|---|---|---|---|")
        modes = ("explicit", "fused", "off")
        meds = {m: statistics.median(qat_step_times(device, m, a.steps, a.warmup)) for m in modes}
        for m, label in (("explicit", "batch statistics, explicit chain (before)"),
                         ("fused", "batch statistics, fused (now)"), ("off", "no batch statistics")):
            print(f"| {label} | {meds[m]:.3f} | {meds['explicit'] / meds[m]:.2f}x | {meds[m] * 195:.0f} |")
        return 0
    print("| mode | median s/step | ratio to fp32 contiguous | s per epoch (195 steps) |")
    print("|---|---|---|---|")
    base = None
    for name, (cl, bf16) in MODES.items():
        med = statistics.median(step_times(device, cl, bf16, a.steps, a.warmup))
        base = base or med
        print(f"| {name} | {med:.3f} | {base / med:.2f}x | {med * 195:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
