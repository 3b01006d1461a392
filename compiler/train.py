"""Plain training and evaluation loops shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .data import DataSplits, TensorBatches, augment_batch, make_loader


def train_float(model: torch.nn.Module, data: DataSplits, *, epochs: int = 20, lr: float = 0.05,
                batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0,
                progress: Callable[[int, float], None] | None = None,
                device: torch.device | str | None = None, channels_last: bool | None = None) -> torch.nn.Module:
    """SGD with Nesterov momentum and a cosine schedule: the full-precision model the compiler starts from.

    On a CUDA ``device`` the training split is copied there once (crops and flips run there too) and the forward
    runs under bf16 autocast in channels-last: a ResNet-20 step is otherwise bound by data handling.
    ``channels_last`` (default: on CUDA only) also applies it on the CPU, where it makes a 2-core ResNet-20 step
    about 1.2x faster (bench/RESULTS.md) but changes the seeded results the tests were tuned on. The model is
    left on ``device`` (default: where it is), in eval mode. ``progress(epoch, mean loss)`` runs after each epoch.
    """
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    channels_last = cuda if channels_last is None else channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cuda:
        loader = TensorBatches(data.train, batch_size, shuffle=True, seed=seed, drop_last=True, device=device)
    else:  # a DataLoader keeps the sample order seeded CPU runs always had
        loader = make_loader(data.train, batch_size, shuffle=True, seed=seed, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = torch.zeros((), device=device)
        for x, y in loader:
            x, y = augment_batch(x.to(device), data.augment, gen), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()  # summed where it lives: no host sync per step
        if progress:
            progress(epoch, float(total) / max(1, len(loader)))
    return model.eval()


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], ds, *, batch_size: int = 256,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent; batches are moved to ``device`` when given (the model must live there)."""
    correct = n = 0
    for x, y in make_loader(ds, batch_size):
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    return 100.0 * correct / max(1, n)


@torch.no_grad()
def mean_loss(model: Callable[[torch.Tensor], torch.Tensor], ds, *, batch_size: int = 256) -> float:
    total = n = 0.0
    for x, y in make_loader(ds, batch_size):
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / max(1.0, n)
