"""Built-in zoo models: PD-QAT's pre-activation ResNet-20 x5 (parameter count and MACs by hand, shapes, capture)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqc.compiler.capture import capture
from mpqc.compiler.ir import OpKind
from mpqc.compiler.loading import load_model
from mpqc.compiler.zoo import PreActResNet20, preact_resnet20x5


def _hand_params(width: int, classes: int = 10) -> int:
    """Count from the architecture: first conv, 9 blocks (BN, 3x3, BN, 3x3; 1x1 conv + BN where the shape
    changes), final BN and FC. A BN has 2 parameters per channel (gamma, beta)."""
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    first = 3 * c1 * 9

    def block(cin, cout, proj):
        n = 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9
        return n + (cin * cout + 2 * cout if proj else 0)

    blocks = (3 * block(c1, c1, False) + block(c1, c2, True) + 2 * block(c2, c2, False)
              + block(c2, c3, True) + 2 * block(c3, c3, False))
    return first + blocks + 2 * c3 + c3 * classes + classes


def _hand_macs(width: int, classes: int = 10) -> int:
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    s1, s2, s3 = 32 * 32, 16 * 16, 8 * 8
    return (s1 * c1 * 3 * 9 + 6 * s1 * c1 * c1 * 9                                 # first conv, stage 1
            + s2 * c2 * c1 * 9 + 5 * s2 * c2 * c2 * 9 + s2 * c2 * c1              # stage 2 + 1x1 shortcut
            + s3 * c3 * c2 * 9 + 5 * s3 * c3 * c3 * 9 + s3 * c3 * c2              # stage 3 + 1x1 shortcut
            + c3 * classes)


def test_preact_resnet20x5_parameter_count():
    m = preact_resnet20x5()
    assert _hand_params(5) == 6_758_810
    assert sum(p.numel() for p in m.parameters()) == 6_758_810
    assert sum(p.numel() for p in PreActResNet20(width=1).parameters()) == _hand_params(1)
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert [m.get_submodule(n).out_channels for n in ("conv1", "layer2.0.conv1", "layer3.2.conv2")] == [80, 160, 320]
    assert len(convs) == 21
    assert sum(isinstance(x, nn.Hardtanh) for x in m.modules()) == 19  # 2 per block + the head


def test_preact_resnet20_output_shape_and_activation():
    torch.manual_seed(0)
    m = PreActResNet20(width=1).eval()
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    r = PreActResNet20(width=1, act="relu")
    assert not any(isinstance(x, nn.Hardtanh) for x in r.modules())
    with pytest.raises(ValueError):
        PreActResNet20(act="gelu")


def test_preact_resnet20_loads_by_arch(tmp_path):
    torch.manual_seed(0)
    m = PreActResNet20(width=1)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    loaded = load_model(str(path), arch="mpqc.compiler.zoo:PreActResNet20")
    assert isinstance(loaded.module, PreActResNet20)
    assert tuple(loaded.example_inputs[0].shape[1:]) == (3, 32, 32)


@pytest.mark.parametrize("width", [1, 5])
def test_preact_resnet20_capture(width):
    m = PreActResNet20(width=width)
    g = capture(m, (torch.randn(1, 3, 32, 32),), fold_bn=True).graph
    ops = list(g.ops.values())
    convs = [o for o in ops if o.kind == OpKind.CONV]
    lins = [o for o in ops if o.kind == OpKind.LINEAR]
    # 1 first conv + 18 block 3x3 convs (= 19 3x3) + 2 1x1 shortcuts; 1 fc
    assert len(convs) == 21 and len(lins) == 1
    assert sum(o.weight_shape[-1] == 3 for o in convs) == 19
    assert sorted(o.name for o in convs if o.weight_shape[-1] == 1) == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert convs[0].name == "conv1" and lins[0].name == "fc"  # the names --fix conv1=8 fc=8 address
    assert sum(o.macs for o in ops) == _hand_macs(width)
    if width == 5:
        assert _hand_macs(5) == 1_011_469_440
    # pre-activation BNs (9 block inputs + the head) have no conv before them and stay; the shortcut BNs and
    # each block's bn2 fold into the conv before them
    assert sum(o.kind == OpKind.NORM for o in ops) == 10
    # every quantized conv after the first reads clip(x, 0, 1): unsigned activations
    for o in convs[1:] + lins:
        assert all(g.tensors[t].nonnegative for t in o.act_inputs), o.name
    assert not g.tensors[convs[0].act_inputs[0]].nonnegative
