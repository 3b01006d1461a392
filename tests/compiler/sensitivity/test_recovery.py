"""The recovery probe (``--weight-alpha auto``) on a small CNN trained on the digits data."""

from __future__ import annotations

import math

import pytest
import torch

from mpqc.compiler.capture import capture
from mpqc.compiler.sensitivity.recovery import (
    RHO_FLOOR,
    ProbeConfig,
    Recovery,
    held_layers,
    probe_assignment,
    probe_recovery,
)


@pytest.fixture(scope="module")
def digits(trained_digits):
    model, data = trained_digits
    return model, capture(model, (torch.randn(1, 1, 8, 8),), fold_bn=True), data


def _rec(**kw) -> Recovery:
    base = dict(w_bits=2, a_bits=2, high_bits=8, probed=["x"], held={}, loss_fp=0.1, ref_before=0.1,
                ref_after=0.2, w_before=1.1, w_after=0.3, a_before=0.6, a_after=0.45, steps=1, train_images=1,
                eval_images=1, time_s=0.0)
    return Recovery(**{**base, **kw})


def test_rho_is_the_fraction_of_excess_loss_over_the_reference_probe_that_stays():
    r = _rec()
    assert r.rho_w == pytest.approx((0.3 - 0.2) / (1.1 - 0.1))  # excess over the reference, after / before
    assert r.rho_a == pytest.approx((0.45 - 0.2) / (0.6 - 0.1))
    assert r.alpha == pytest.approx(r.rho_w / r.rho_a)
    assert _rec(w_after=0.05).rho_w == RHO_FLOOR  # ended below the reference: floored, never zero
    assert _rec(a_after=2.0).rho_a == 1.0  # got worse: capped at "nothing recovered"
    assert _rec(a_before=0.05).rho_a == 1.0  # quantizing did not hurt: the scores stay as measured
    assert set(_rec().to_dict()) >= {"rho_w", "rho_a", "alpha", "w_before", "ref_after"}


def test_probes_hold_the_ends_and_fixed_layers_and_quantize_the_rest(digits):
    _, cap, _ = digits
    graph = cap.graph
    names = [op.name for op in graph.layers()]
    held = held_layers(graph, {"conv3": {"w": 4, "a": None, "e": None}}, 8)
    assert held == {names[0]: (8, 8), names[-1]: (8, 8), "conv3": (4, 8)}
    w_probe = probe_assignment(graph, w_bits=2, a_bits=None, high_bits=8, held=held)
    a_probe = probe_assignment(graph, w_bits=None, a_bits=3, high_bits=8, held=held)
    for n in names:
        if n in held:
            assert (w_probe[n].w_bits, w_probe[n].a_bits) == held[n] == (a_probe[n].w_bits, a_probe[n].a_bits)
        else:
            assert (w_probe[n].w_bits, w_probe[n].a_bits) == (2, 8)
            assert (a_probe[n].w_bits, a_probe[n].a_bits) == (8, 3)


def test_probe_measures_damage_and_recovery_of_two_bit_weights(digits):
    model, cap, data = digits
    cfg = ProbeConfig(steps=25, batch_size=32, lr=0.01, eval_samples=256, seed=0)
    rec = probe_recovery(cap, model, data, w_bits=2, a_bits=2, config=cfg)
    names = [op.name for op in cap.graph.layers()]
    assert rec.probed == names[1:-1] and rec.steps == 25 and rec.eval_images == 256
    assert abs(rec.ref_before - rec.loss_fp) < 0.05  # 8 bits everywhere: next to the float model
    assert rec.w_before > rec.ref_before + 0.1  # 2-bit weights hurt before fine-tuning ...
    assert rec.w_after < rec.w_before  # ... and fine-tuning wins part of it back
    assert RHO_FLOOR <= rec.rho_w < 1.0 and RHO_FLOOR <= rec.rho_a <= 1.0
    assert math.isfinite(rec.alpha) and rec.alpha > 0
    # the probes train copies: the captured graph the compile goes on with is untouched
    again = probe_recovery(cap, model, data, w_bits=2, a_bits=2, config=cfg)
    assert again.w_before == pytest.approx(rec.w_before) and again.ref_before == pytest.approx(rec.ref_before)


def test_probe_config_rejects_bad_values():
    for bad in (dict(steps=0), dict(eval_samples=0), dict(lr=0.0), dict(lr=float("nan"))):
        with pytest.raises(ValueError):
            ProbeConfig(**bad)
