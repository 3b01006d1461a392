"""The deploy tail (compiler/finetune/deploy_tail.py): the last steps train what the export writes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from mpqc.compiler.capture import capture
from mpqc.compiler.data import DataSplits
from mpqc.compiler.export.qdq import _quantize_biases
from mpqc.compiler.finetune import FinetuneConfig, finetune, prepare
from mpqc.compiler.finetune.deploy_tail import DeployTail, tail_start
from mpqc.compiler.finetune.renorm import Renormalizer
from mpqc.compiler.quantize import LayerQuant, bias_sites
from mpqc.compiler.train import evaluate


def _quantized(model, data, cfg, w=2, a=2):
    cap = capture(copy.deepcopy(model), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    return prepare(cap, {op.name: LayerQuant(w, a) for op in cap.graph.layers()}, data, cfg)


def _subset(data: DataSplits, n: int) -> DataSplits:
    x, y = data.train.tensors
    return DataSplits(data.name, TensorDataset(x[:n], y[:n]), data.calib, data.val, data.num_classes)


def _export_rounding_changes(q, x) -> float:
    """How far the export's int32 bias rounding moves the outputs of ``q`` on ``x``."""
    q2 = copy.deepcopy(q).eval()
    with torch.no_grad():
        before = q2(x)
        _quantize_biases(q2.gm, [])
        q2.gm.graph.lint()
        q2.gm.recompile()
        return float((q2(x) - before).abs().max())


def _in_tail(q) -> bool:
    """Whether the tail is on: an offset in the batch renormalisation (stats form) or quantizers in the graph."""
    renorm = getattr(q.gm, "renorm", {})
    return hasattr(q.gm, "tail_bq") or any(m.offset is not None for m in renorm.values())


def _on_grid(q) -> bool:
    for _, bias, _, act, weight in bias_sites(q.gm):
        codes = q._param(str(bias.target)).detach() / (act.scale.detach().abs() * weight.scale.detach().abs())
        if not torch.allclose(codes, codes.round(), atol=1e-3):
            return False
    return True


def test_a_tail_fraction_too_small_for_one_step_still_runs_the_last_step():
    """--deploy-tail 0.01 over 44 steps rounded to an empty tail: no bias reached its grid, and nothing said so."""
    assert tail_start(0.01, 44) == 43 and tail_start(0.0, 44) == 44 and tail_start(0.25, 16) == 12
    assert tail_start(0.5, 0) == 0


@pytest.mark.parametrize("batch_stats,form", [(True, "stats"), (False, "folded")])
def test_tail_begins_at_its_step_and_leaves_the_model_the_export_computes(float_model, digits, batch_stats, form):
    data = _subset(digits, 512)
    cfg = FinetuneConfig(epochs=2, lr=0.05 if batch_stats else 0.01, batch_size=64, deploy_tail=0.25,
                         batch_stats=batch_stats)
    q = _quantized(float_model, data, cfg)
    keys = set(q.state_dict())
    convs = [op.name for op in q.graph_ir.layers() if op.kind.value in ("conv", "linear")]
    assert [key for _, _, key, _, _ in bias_sites(q.gm)] == convs  # every conv (BN-folded bias) and the linear
    seen = []
    res = finetune(q, float_model, data, cfg, progress=False,
                   callback=lambda ev, info: seen.append(_in_tail(q)) if ev == "step" else None)
    total = 2 * 8
    assert seen.index(True) == tail_start(0.25, total) == 12 and all(seen[12:])
    assert res.summary["deploy_tail"] == {"from_step": 12, "steps": 4, "form": form, "biases_on_grid": len(convs)}
    assert set(q.state_dict()) == keys and not _in_tail(q)  # back on the captured graph
    assert _on_grid(q)
    x = digits.val.tensors[0][:256]
    assert _export_rounding_changes(q, x) < 1e-5  # the deploy graph's bias rounding is a no-op now
    assert res.final_accuracy == pytest.approx(evaluate(q, digits.val))


def test_stats_form_evaluates_what_the_folded_rounded_model_computes(float_model, digits):
    # the offset is the fold's rounding error: the eval-mode model inside the tail is the exported one
    torch.manual_seed(1)
    q = _quantized(float_model, digits, FinetuneConfig())
    renorm = Renormalizer(q)
    renorm.calibrate([digits.calib.tensors[0][:256]], "cpu")
    with torch.no_grad():  # move the maps away from the identity start, as training does
        for m in renorm.modules.values():
            m.gain.mul_(1 + 0.3 * torch.rand_like(m.gain))
            m.bias.add_(0.2 * torch.randn_like(m.bias))
            m.running_var.mul_(1 + 0.5 * torch.rand_like(m.running_var))
    x = digits.val.tensors[0][:256]
    q.eval()
    with torch.no_grad():
        plain = q(x)
        tail = DeployTail(q, renorm, 0)
        tail.enter()
        assert len(tail._renorms) == len(renorm.modules)  # every conv via its renorm
        linears = [op.name for op in q.graph_ir.layers() if op.kind.value == "linear"]
        assert len(tail._nodes) == len(linears) == 1  # the classifier, which has no statistics, in the graph
        inside = q(x)
        tail.leave()
        after = q(x)
    assert not hasattr(q.gm, "renorm") and _on_grid(q)
    assert torch.allclose(inside, after, atol=1e-4)
    assert (inside - plain).abs().max() > 1e-2  # at 2 bits the rounding moves the outputs, so the match means it


def test_without_the_tail_the_export_moves_the_outputs(float_model, digits):
    # the contrast that makes the test above mean something: at 2 bits the grid is coarse
    data = _subset(digits, 256)
    cfg = FinetuneConfig(epochs=1, lr=0.05, batch_size=64, deploy_tail=0.0)
    q = _quantized(float_model, data, cfg)
    finetune(q, float_model, data, cfg, progress=False)
    assert _export_rounding_changes(q, digits.val.tensors[0][:256]) > 1e-3


def test_tail_trains_through_the_rounding(float_model, digits):
    # straight-through: the biases and weights keep learning inside the tail (not frozen by the rounding)
    data = _subset(digits, 512)
    cfg = FinetuneConfig(epochs=2, lr=0.05, batch_size=64, deploy_tail=0.5)
    q = _quantized(float_model, data, cfg)
    snaps = {}

    def grab(ev, info):
        if ev == "step" and info["epoch"] == 1 and info["step"] in (0, 7):
            snaps[info["step"]] = {k: v.detach().clone() for k, v in q.state_dict().items() if k.endswith("bias")}

    res = finetune(q, float_model, data, cfg, progress=False, callback=grab)
    assert any(not torch.equal(snaps[0][k], snaps[7][k]) for k in snaps[0])
    assert res.final_accuracy == pytest.approx(evaluate(q, digits.val))
    plain = finetune(_quantized(float_model, data, cfg), float_model, data, cfg.replace(deploy_tail=0.0),
                     progress=False)
    assert res.final_accuracy > plain.final_accuracy - 5.0  # half the run on the grid costs little


def test_a_tail_checkpoint_resumed_without_the_tail_starts_afresh(float_model, digits, tmp_path):
    data = _subset(digits, 256)  # 4 steps an epoch, the tail from step 4 (epoch 2)
    cfg = FinetuneConfig(epochs=2, lr=0.05, batch_size=64, deploy_tail=0.5, checkpoint_dir=str(tmp_path))
    q0 = _quantized(float_model, data, cfg)
    finetune(copy.deepcopy(q0), float_model, data, cfg, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["deploy_tail"] == "stats"
    res = finetune(copy.deepcopy(q0), float_model, data, cfg.replace(deploy_tail=0.0), progress=False)
    assert res.resumed_from is None and len(res.metrics) == 2  # not a load error: a fresh run


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "half"])
def test_deploy_tail_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match="deploy_tail"):
        FinetuneConfig(deploy_tail=bad)
