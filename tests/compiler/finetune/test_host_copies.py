"""A fine-tuning step copies nothing from the host: on CUDA each such copy waits for the device (tests/host_copies.py),
and the fake-quant range made on the CPU and moved over on every call did that ~80 times a ResNet-20 step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpqc.compiler.capture import capture
from mpqc.compiler.data import DataSplits, make_loader
from mpqc.compiler.deploy_grid import fit_to_profile
from mpqc.compiler.finetune.renorm import Renormalizer
from mpqc.compiler.quantize import LayerQuant, QuantizedModel
from tests.host_copies import HostToDevice
from tests.models import resnet_tiny, tiny_images


def test_a_mixed_precision_fine_tuning_step_copies_nothing_from_the_host():
    model = resnet_tiny()
    x = tiny_images(32, 2)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
    cap = capture(model, (x[:1],), fold_bn=True)
    layers = cap.graph.layers()
    g = torch.Generator().manual_seed(1)
    plan = {}
    for op in layers:  # kernel-wise weights (a bits tensor) and per-tensor inputs (a python int)
        c = cap.gm.get_parameter(op.weight_fqn).shape[0]
        plan[op.name] = LayerQuant(tuple(torch.randint(2, 7, (c,), generator=g).tolist()), 3)
    q = QuantizedModel(cap)
    q.apply(plan)
    fit_to_profile(q, "ort")  # the residual-add quantizers the export places
    ds = TensorDataset(x, y)
    q.calibrate(make_loader(DataSplits("tiny", ds, ds, ds, 10, None).calib, 32))
    renorm = Renormalizer(q)
    renorm.calibrate([x], "cpu")
    assert q.rq and renorm.modules  # every kind of module a step runs through is there
    q.train(True)
    q.to("meta")
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    xm, ym = x.to("meta"), y.to("meta")  # the batch itself comes over once a step, as in the loop
    with HostToDevice() as h:
        loss = F.cross_entropy(q(xm), ym)
        loss.backward()
        opt.step()
    assert loss.device.type == "meta"
    assert not h.copies, h.copies


def test_the_batch_augmentation_copies_its_draws_over_once():
    """Crops and flips are drawn on the CPU (the same draws on every device); they travel in one copy, not three."""
    from mpqc.compiler.data import augment_batch

    x = torch.randn(16, 3, 32, 32)
    on_cpu = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    with HostToDevice() as h:
        on_meta = augment_batch(x.to("meta"), "crop_flip", torch.Generator().manual_seed(5))
    assert on_meta.shape == on_cpu.shape == x.shape
    assert len(h.copies) == 2  # x itself (the test's move), and the draws
