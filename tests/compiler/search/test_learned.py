"""Learned energy allocation (Garg et al.): meets the MAC-weighted budget and beats the uniform allocation."""

from __future__ import annotations

import math

import pytest
import torch

from mpqc.compiler.search.learned import learned_energy_allocation, mac_weighted_mean


class NoisyMLP(torch.nn.Module):
    """Three frozen linear layers; each output gets additive Gaussian noise with std c_l / sqrt(E_l)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = [torch.randn(16, 8, generator=g) / 8 ** 0.5, torch.randn(16, 16, generator=g) / 4,
                  torch.randn(4, 16, generator=g) / 4]
        self.c = {"l0": 0.05, "l1": 0.5, "l2": 0.05}  # l1's noise hurts most
        self.macs = {"l0": 8 * 16, "l1": 16 * 16, "l2": 16 * 4}

    def forward(self, x, log_e, gen):
        for k, w in zip(("l0", "l1", "l2"), self.w):
            x = x @ w.T
            sigma = self.c[k] * torch.exp(-0.5 * log_e[k])
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            if k != "l2":
                x = torch.relu(x)
        return x


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only contend on a shared 2-core box (a scoped override, restored)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup():
    net = NoisyMLP()
    g = torch.Generator().manual_seed(1)
    net.w = [w.double() for w in net.w]
    xs = [torch.randn(256, 8, generator=g).double() for _ in range(2)]
    with torch.no_grad():
        clean = [net.forward(x, {k: torch.tensor(60.0, dtype=torch.float64) for k in net.macs}, g) for x in xs]
    batches = list(zip(xs, clean))
    counter = [0]

    def loss(log_e, batch, seed=None):
        x, y = batch
        counter[0] += 1
        gen = torch.Generator().manual_seed(counter[0] if seed is None else seed)
        return 100.0 * ((net.forward(x, log_e, gen) - y) ** 2).mean()  # a task loss of CE's magnitude

    return net, batches, loss


def test_learned_allocation_meets_the_budget_and_favours_the_sensitive_layer():
    net, batches, loss = _setup()
    res = learned_energy_allocation(loss, net.macs, e_init=30.0, e_target=10.0, batches=batches, steps=200,
                                    lam=4.0, lr=0.05, project=True)
    assert res.met and res.e_mean <= 10.0 * (1 + 1e-6)
    assert res.e["l1"] > 2 * res.e["l0"] and res.e["l1"] > 2 * res.e["l2"]
    assert mac_weighted_mean(res.e, net.macs) == pytest.approx(res.e_mean)

    # lower task loss than the same E everywhere at the same mean (common random numbers for both)
    def mean_loss(e):
        log_e = {k: torch.tensor(math.log(v), dtype=torch.float64) for k, v in e.items()}
        with torch.no_grad():
            return sum(float(loss(log_e, b, seed=s)) for s in range(10) for b in batches)

    assert mean_loss(res.e) < 0.8 * mean_loss({k: res.e_mean for k in net.macs})


def test_penalty_is_inactive_below_the_target_and_history_is_recorded():
    net, batches, loss = _setup()
    res = learned_energy_allocation(loss, net.macs, e_init=1.0, e_target=1000.0, batches=batches, steps=5, lr=0.01)
    assert all(h["penalty"] == 0.0 for h in res.history) and len(res.history) == 5
    snapped = res.snapped([1.0, 10.0, 100.0])
    assert all(v in (1.0, 10.0, 100.0) and v <= res.e[k] * (1 + 1e-9) or v == 1.0 for k, v in snapped.items())


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        learned_energy_allocation(lambda log_e: torch.zeros(()), {}, 1.0, 1.0, [], 1)
    with pytest.raises(ValueError):
        learned_energy_allocation(lambda log_e: torch.zeros(()), {"a": 1}, 1.0, -1.0, [], 1)
