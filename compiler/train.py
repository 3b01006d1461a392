"""Plain training and evaluation loops shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .data import DataSplits, augment_batch, make_loader


def train_float(model: torch.nn.Module, data: DataSplits, *, epochs: int = 20, lr: float = 0.05,
                batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0,
                progress: Callable[[int, float], None] | None = None) -> torch.nn.Module:
    """SGD with Nesterov momentum and a cosine schedule: the full-precision model the compiler starts from."""
    torch.manual_seed(seed)
    model.train()
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for x, y in loader:
            x = augment_batch(x, data.augment, gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if progress:
            progress(epoch, total / max(1, len(loader)))
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
