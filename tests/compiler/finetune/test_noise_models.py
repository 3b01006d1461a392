"""The injected analog noise follows the target's noise model: thermal (with its sigma_t), shot and weight noise
each add the output variance the cost model (``output_noise_variance``) prices, and a noisier target evaluates
worse (the search and the accuracy beside its plan share one noise model)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import mpqc.targets
from mpqc.compiler.capture import capture
from mpqc.compiler.data import DataSplits
from mpqc.compiler.finetune import (
    DistillConfig,
    EnergyConfig,
    EnergyObjective,
    FinetuneConfig,
    NoiseInjector,
    evaluate_at_energy,
    prepare,
)
from mpqc.compiler.finetune import finetune as run_finetune
from mpqc.compiler.finetune.energy import AnalogNoiseModel, LayerNoise, _Gemm, _shot_sigma_fn
from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import LayerQuant
from mpqc.cost_models.analog import LayerStats, output_noise_variance, weight_sigma
from mpqc.targets import load_target

ANALOG_TOML = Path(mpqc.targets.__file__).parent / "analog.toml"


def _target(kind: str, sigma_t: float = 0.01, weight_noise: float = 0.1):
    return SimpleNamespace(analog=SimpleNamespace(noise=kind, sigma_t=sigma_t, weight_noise=weight_noise, adc_bits=8))


@pytest.fixture(scope="module")
def q8(float_model, digits):
    """The digits CNN at W8A8, calibrated, in eval mode."""
    cap = capture(copy.deepcopy(float_model), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    q = prepare(cap, {op.name: LayerQuant(8, 8) for op in cap.graph.layers()}, digits, FinetuneConfig())
    return q.eval()


def _measure(q, layer: str, e: float, model: AnalogNoiseModel, x: torch.Tensor, draws: int):
    """Per-channel mean square of the injected output noise over ``draws`` noise seeds, and the layer's input."""
    rec: dict = {}
    with NoiseInjector(q, e, layers=[layer], noise=model) as inj:
        h1 = inj.modules[layer].register_forward_hook(lambda m, a, o: rec.update(y=a[0], out=o))
        h2 = q.act_quantizers(layer)[0].register_forward_hook(lambda m, a, o: rec.update(x=o))
        sq, count = 0.0, 0
        try:
            for s in range(draws):
                with torch.no_grad(), inj.fixed_noise(s):
                    q(x)
                d = (rec["out"] - rec["y"]).double()
                dims = [0, 2, 3] if d.dim() == 4 else [0]
                sq = sq + d.pow(2).sum(dims)
                count += d.numel() // d.shape[1]
        finally:
            h1.remove()
            h2.remove()
    return (sq / count).numpy(), rec["x"].detach()


def _predicted(q, layer: str, e: float, target, x: torch.Tensor) -> np.ndarray:
    """The cost model's output noise variance per channel, from the operands the layer computes on."""
    op = q.graph_ir.ops[layer]
    wq, aq = q.weight_quantizer(layer), q.act_quantizers(layer)[0]
    w = wq(q.weight(layer)).detach()
    geometry = {"groups": op.groups, "stride": tuple(op.attrs.get("stride", [1, 1])),
                "padding": tuple(op.attrs.get("padding", [0, 0]))} if w.dim() == 4 else {}
    stats = LayerStats(r_w=(wq.scale.abs() * (torch.exp2(wq.bits.float()) - 1)).detach().double().numpy(),
                       r_x=float(aq.scale.detach().abs() * (2**aq.bits - 1)),
                       w_row_norms=w.double().reshape(w.shape[0], -1).norm(dim=1).numpy(),
                       x_patch_sq=LayerStats.from_tensors(w, x, **geometry).x_patch_sq)
    return output_noise_variance(op, e, target, stats)


# per-channel and whole-layer relative tolerance: weight noise is one draw per pass, so its estimate is coarser
# (measured on this model: thermal/shot within 6 % per channel, 0.4 % per layer; weight 6 % and 1 %)
CASES = [("thermal", 0.01, 0.1, 60, 0.12, 0.02), ("thermal", 10.0, 0.1, 60, 0.12, 0.02),
         ("shot", 0.01, 0.1, 60, 0.12, 0.02), ("shot", 10.0, 0.1, 60, 0.12, 0.02),
         ("weight", 0.01, 0.1, 200, 0.2, 0.05), ("weight", 0.01, 0.5, 200, 0.2, 0.05)]


@pytest.mark.parametrize("layer", ["conv2", "fc"])
@pytest.mark.parametrize("kind,sigma_t,weight_noise,draws,rtol_channel,rtol_layer", CASES)
def test_injected_noise_variance_is_the_cost_models(q8, digits, layer, kind, sigma_t, weight_noise, draws,
                                                    rtol_channel, rtol_layer):
    x = digits.val.tensors[0][:64]
    model = AnalogNoiseModel(kind, sigma_t=sigma_t, weight_noise=weight_noise)
    for e in (0.5, 40.0):
        empirical, x_in = _measure(q8, layer, e, model, x, draws)
        predicted = _predicted(q8, layer, e, _target(kind, sigma_t, weight_noise), x_in)
        assert np.all(predicted > 0)
        np.testing.assert_allclose(empirical, predicted, rtol=rtol_channel)
        assert empirical.sum() == pytest.approx(predicted.sum(), rel=rtol_layer)


def test_sigma_t_scales_thermal_noise_and_the_models_differ(q8, digits):
    x = digits.val.tensors[0][:64]
    v = {st: _measure(q8, "conv3", 2.0, AnalogNoiseModel("thermal", sigma_t=st), x, 20)[0] for st in (0.01, 0.1)}
    np.testing.assert_allclose(v[0.1] / v[0.01], 100.0, rtol=1e-3)  # same draws: variance ∝ sigma_t²
    shot = _measure(q8, "conv3", 2.0, AnalogNoiseModel("shot"), x, 20)[0]
    weight = _measure(q8, "conv3", 2.0, AnalogNoiseModel("weight"), x, 20)[0]
    assert not np.allclose(shot, v[0.01], rtol=0.5) and not np.allclose(weight, v[0.01], rtol=0.5)


@pytest.mark.parametrize("groups,c_in,c_out,stride,padding", [(8, 8, 8, 1, 1), (2, 4, 6, 2, 1), (1, 3, 5, 1, 0)])
@pytest.mark.parametrize("kind", ["shot", "weight"])
def test_grouped_conv_noise_matches_the_cost_model(kind, groups, c_in, c_out, stride, padding):
    g = torch.Generator().manual_seed(groups * 31 + c_out)
    w = torch.randn(c_out, c_in // groups, 3, 3, generator=g)
    x = torch.rand(16, c_in, 7, 7, generator=g)
    op = SimpleNamespace(name="dw", kind=OpKind.CONV, fan_in=(c_in // groups) * 9, out_channels=c_out, groups=groups,
                         attrs={"stride": [stride, stride], "padding": [padding, padding]},
                         weight_shape=[c_out, c_in // groups, 3, 3])
    gemm = _Gemm(op)
    stats = LayerStats.from_tensors(w, x, groups=groups, stride=stride, padding=padding)
    # the patch energy of every output, averaged, is the cost model's mean ||x_patch||² (the real fan-in)
    y = gemm(x, w)
    p = gemm.patch_sq(x).expand_as(y)
    np.testing.assert_allclose(p.double().mean((0, 2, 3)).numpy(), stats.x_patch_sq, rtol=1e-5)
    if kind == "shot":
        sigma_fn = _shot_sigma_fn(gemm)
    else:
        r_w = torch.as_tensor(stats.r_w, dtype=torch.float32)
        sigma_fn = lambda: weight_sigma(r_w, 1.0, 0.1)  # noqa: E731
    e = 3.0
    mod = LayerNoise("dw", sigma_fn, torch.tensor(e).log(), axis=1, channels=c_out, macs=1, seed=3, kind=kind,
                     gemm=gemm)
    draws = 400 if kind == "weight" else 40
    sq = sum((mod(y, x, w) - y).double().pow(2).mean((0, 2, 3)) for _ in range(draws)) / draws
    predicted = output_noise_variance(op, e, _target(kind), stats)
    np.testing.assert_allclose(sq.numpy(), predicted, rtol=0.3 if kind == "weight" else 0.06)
    assert float(sq.sum()) == pytest.approx(float(predicted.sum()), rel=0.08 if kind == "weight" else 0.02)


def test_a_larger_sigma_t_lowers_the_noisy_accuracy(q8, digits, tmp_path):
    accs = {}
    for st in (0.01, 10.0):  # the bug hunt's repro: copies of targets/analog.toml differing only in sigma_t
        path = tmp_path / f"an_{st}.toml"
        text = ANALOG_TOML.read_text()
        assert "sigma_t = 0.01" in text
        path.write_text(text.replace("sigma_t = 0.01", f"sigma_t = {st}"))
        target = load_target(str(path))
        accs[st] = evaluate_at_energy(q8, digits.val, 1.0, noise=target, seed=EnergyObjective.EVAL_SEED)
    assert accs[10.0] < accs[0.01] - 30.0, accs
    # the default (no model given) is the built-in target's thermal noise
    assert evaluate_at_energy(q8, digits.val, 1.0, seed=EnergyObjective.EVAL_SEED) == accs[0.01]
    quiet = evaluate_at_energy(q8, digits.val, 1.0, seed=EnergyObjective.EVAL_SEED,
                               noise=AnalogNoiseModel("weight", weight_noise=0.001))
    loud = evaluate_at_energy(q8, digits.val, 1.0, seed=EnergyObjective.EVAL_SEED,
                              noise=AnalogNoiseModel("weight", weight_noise=1.0))
    assert loud < quiet - 30.0


def test_noise_model_from_targets_and_configs():
    assert AnalogNoiseModel.of(None) == AnalogNoiseModel("thermal", 0.01, 0.1)
    t = load_target("analog")
    assert AnalogNoiseModel.of(t) == AnalogNoiseModel.of(t.analog) == AnalogNoiseModel("thermal", t.analog.sigma_t,
                                                                                      t.analog.weight_noise)
    ns = SimpleNamespace(noise="shot", sigma_t=0.5)  # e.g. an energy config carrying the target's settings
    assert AnalogNoiseModel.of(ns) == AnalogNoiseModel("shot", 0.5, 0.1)
    assert AnalogNoiseModel.of(EnergyConfig()) == AnalogNoiseModel()  # a config without them: the seed's model
    assert AnalogNoiseModel("weight", weight_noise=0.2).as_dict() == {"noise": "weight", "sigma_t": 0.01,
                                                                      "weight_noise": 0.2}
    with pytest.raises(ValueError, match="unknown analog noise model"):
        AnalogNoiseModel("flicker")
    with pytest.raises(ValueError, match="sigma_t"):
        AnalogNoiseModel("thermal", sigma_t=0.0)


def test_shot_and_weight_noise_refuse_an_uncovered_layer_and_leave_the_graph(digits):
    class Conv1dNet(torch.nn.Module):  # a 1-d convolution: shot and weight noise cover conv2d and linear only
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv1d(8, 10, 3)

        def forward(self, x):
            return self.c(x.flatten(1, 2)).mean(-1)

    cap = capture(Conv1dNet().eval(), (torch.randn(1, 1, 8, 8),))
    assert [op.kind for op in cap.graph.layers()] == [OpKind.CONV]
    q = prepare(cap, {op.name: LayerQuant(8, 8) for op in cap.graph.layers()}, digits, FinetuneConfig())
    code = q.gm.code
    for kind in ("shot", "weight"):
        with pytest.raises(ValueError, match="2-d convolutions and linear layers"):
            NoiseInjector(q, 1.0, noise=AnalogNoiseModel(kind))
        assert not hasattr(q.gm, "noise") and q.gm.code == code
    with NoiseInjector(q, 1.0) as inj:  # thermal noise needs only the ranges
        assert inj.noise.kind == "thermal"


@pytest.mark.parametrize("kind", ["shot", "weight"])
def test_energy_training_and_noise_aware_finetuning_use_the_configured_model(float_model, digits, kind, monkeypatch):
    monkeypatch.setattr(EnergyObjective, "noise_model", lambda self: AnalogNoiseModel(kind))
    cap = capture(copy.deepcopy(float_model), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    x, y = digits.train.tensors
    small = DataSplits(digits.name, TensorDataset(x[:256], y[:256]), digits.calib, digits.val, digits.num_classes)
    learn = FinetuneConfig(epochs=1, method="energy", scheduler="constant", distill=DistillConfig(enabled=False),
                           energy=EnergyConfig(mode="learn", e_init=30.0, e_target=3.0, penalty=4.0, lr=0.1))
    q = prepare(cap, {op.name: LayerQuant(6, 6) for op in cap.graph.layers()}, digits, learn)
    res = run_finetune(q, None, small, learn, progress=False)
    assert res.summary["noise"]["noise"] == kind
    assert res.summary["e_bar"] < 30.0  # log E received gradients through the shot / weight noise
    assert res.final_accuracy == pytest.approx(
        evaluate_at_energy(q, digits.val, res.emac, noise=AnalogNoiseModel(kind), seed=EnergyObjective.EVAL_SEED))
    fixed = learn.replace(energy=EnergyConfig(mode="fixed"), lr=0.01)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    res = run_finetune(q, None, small, fixed, progress=False, emac={"conv2": 5.0, "fc": [5.0] * 10})
    assert res.summary["noise"]["noise"] == kind and set(res.emac) == {"conv2", "fc"}
    assert any(not torch.equal(before[k], v) for k, v in q.state_dict().items())  # the weights trained


def test_weight_noise_is_one_draw_per_pass_shared_by_the_batch():
    op = SimpleNamespace(name="fc", kind=OpKind.LINEAR, fan_in=6, out_channels=3, groups=1, attrs={},
                         weight_shape=[3, 6])
    gemm = _Gemm(op)
    w = torch.randn(3, 6)
    mod = LayerNoise("fc", lambda: torch.ones(3), torch.zeros(()), axis=-1, channels=3, macs=18, seed=1,
                     kind="weight", gemm=gemm)
    x = torch.randn(1, 6).expand(4, 6)  # four copies of one input: one noisy weight gives four equal outputs
    out = mod(F.linear(x, w), x, w)
    assert torch.allclose(out, out[:1].expand_as(out)) and not torch.allclose(out, F.linear(x, w))
    assert int(mod.counter) == w.numel()
