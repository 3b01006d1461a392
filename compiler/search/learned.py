"""``--search learned`` on an analog target: learn the energy per MAC of each layer by gradient descent.

Garg et al. (research/seeds.md §2.3) train only θ_l = log E_l, the network weights frozen, with

    L = task loss + λ · max(0, log Ē − log E*),     Ē = Σ_l MACs_l · E_l / Σ_l MACs_l

(Adam, lr 0.01, λ = 4 for thermal noise, E initialised at 1000). The noise itself (σ ∝ E^-1/2 on each layer
output) lives in the model: ``model_fn(log_e, batch)`` runs the network with the given log-energies and
returns the task loss, differentiable in them. The noise injection of the real model is wired by the
pipeline; this module only needs that callable, so it is tested on a small synthetic network.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch


@dataclass
class LearnedAllocation:
    """The learned energies per MAC, their MAC-weighted mean, and the training trace."""

    e: dict[str, float]
    e_mean: float
    e_target: float
    met: bool  # Ē <= E* (within 1e-6 relative)
    history: list[dict] = field(default_factory=list)  # per step: loss, task, penalty, e_mean

    def snapped(self, grid) -> dict[str, float]:
        """Each layer's E rounded down to the nearest grid value (so Ē can only fall), the lowest if below."""
        g = sorted(float(v) for v in grid)
        out = {}
        for k, v in self.e.items():
            below = [x for x in g if x <= v * (1 + 1e-9)]
            out[k] = below[-1] if below else g[0]
        return out


def mac_weighted_mean(e: Mapping[str, torch.Tensor | float], macs: Mapping[str, float]) -> torch.Tensor | float:
    """Ē = Σ MACs_l·E_l / Σ MACs_l."""
    total = sum(float(macs[k]) for k in e)
    return sum(float(macs[k]) * e[k] for k in e) / total


def learned_energy_allocation(model_fn: Callable[[dict, object], torch.Tensor], layers_macs: Mapping[str, float],
                              e_init: float | Mapping[str, float], e_target: float, batches: Iterable,
                              steps: int, lam: float = 4.0, lr: float = 0.01, *, project: bool = False,
                              constrained: bool = True) -> LearnedAllocation:
    """Train log E per layer (Garg et al.) and return the allocation.

    Args:
        model_fn: ``model_fn(log_e, batch) -> loss``; ``log_e`` maps each layer to a scalar tensor that requires
            grad. (A callable of one argument, ``model_fn(log_e)``, is accepted too and gets no batch.)
        layers_macs: MACs per layer (the weights of Ē).
        e_init: initial E (one value, or one per layer).
        e_target: E*, the budget on the MAC-weighted mean.
        batches: an iterable of batches, cycled.
        steps: optimisation steps.
        lam: weight of the constraint penalty λ.
        lr: Adam learning rate on log E.
        project: after training, scale every E by E*/Ē when Ē > E* (the penalty is soft; this makes it hard).
        constrained: ``True``: λ·max(0, log Ē − log E*); ``False``: λ·log Ē (Garg's unconstrained variant).
    """
    if not layers_macs:
        raise ValueError("layers_macs is empty: no layer to allocate energy to")
    if not (math.isfinite(e_target) and e_target > 0):
        raise ValueError(f"e_target must be positive, not {e_target!r}")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    names = list(layers_macs)
    init = {k: float(e_init[k] if isinstance(e_init, Mapping) else e_init) for k in names}
    if any(not (math.isfinite(v) and v > 0) for v in init.values()):
        raise ValueError("every initial energy must be positive")
    log_e = {k: torch.tensor(math.log(init[k]), dtype=torch.float64, requires_grad=True) for k in names}
    macs = torch.tensor([float(layers_macs[k]) for k in names], dtype=torch.float64)
    weights = macs / macs.sum()
    opt = torch.optim.Adam(list(log_e.values()), lr=lr)
    log_target = math.log(e_target)
    takes_batch = _arity(model_fn) != 1
    history: list[dict] = []
    source = itertools.cycle(batches) if takes_batch else itertools.repeat(None)
    for _ in range(steps):
        batch = next(source)
        opt.zero_grad()
        task = model_fn(log_e, batch) if takes_batch else model_fn(log_e)
        stacked = torch.stack([log_e[k] for k in names])
        log_mean = torch.log((weights * torch.exp(stacked)).sum())
        penalty = torch.clamp(log_mean - log_target, min=0.0) if constrained else log_mean
        loss = task + lam * penalty
        loss.backward()
        opt.step()
        history.append({"loss": float(loss.detach()), "task": float(task.detach()),
                        "penalty": float(penalty.detach()), "e_mean": float(torch.exp(log_mean.detach()))})
    with torch.no_grad():
        e = {k: float(torch.exp(log_e[k])) for k in names}
    mean = float(sum(weights[i].item() * e[k] for i, k in enumerate(names)))
    if project and mean > e_target:
        e = {k: v * e_target / mean for k, v in e.items()}
        mean = e_target
    return LearnedAllocation(e, mean, float(e_target), mean <= e_target * (1 + 1e-6), history)


def _arity(fn) -> int:
    import inspect

    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return 2
    return len(params)
