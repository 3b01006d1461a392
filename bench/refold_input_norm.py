"""Re-express a trained CIFAR ResNet-20 for another input normalisation by folding the change into conv1 / bn1.

Before commit ed9286b ``load_data`` normalised CIFAR-10 with a float32 mean that stalled at 2**24 (0.32768 per
channel, std 0.2775 / 0.2693 / 0.2682), so the 92.04 % H100 model of issue 9 expects those inputs. With
x_old = a·x_new + b per channel (a = std_new / std_old, b = (mean_new - mean_old) / std_old), conv1(x_old) =
conv1'(x_new) + W·b, and the constant W·b moves into bn1's running mean. Only the zero padding at the image
border differs (it pads x_new, not x_old), which is why the accuracy moves a little.

    python bench/refold_input_norm.py bench_out/gpu/resnet20_fp.pt bench_out/gpu/resnet20_fp_norm.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

OLD_MEAN = (0.32768, 0.32768, 0.32768)  # what the float32 sum gave on all 50,000 training images
OLD_STD = (0.27751842, 0.2693107, 0.26824388)


def refold(state: dict, old_mean, old_std, new_mean, new_std, eps: float = 1e-6) -> dict:
    """A copy of ``state`` (conv1.weight, bn1.running_mean) that reads inputs normalised with the new statistics."""
    m_old, s_old = torch.tensor(old_mean), torch.tensor(old_std) + eps
    m_new, s_new = torch.tensor(new_mean), torch.tensor(new_std)
    a, b = s_new / s_old, (m_new - m_old) / s_old
    out = dict(state)
    w = state["conv1.weight"]
    out["conv1.weight"] = w * a.view(1, -1, 1, 1)
    out["bn1.running_mean"] = state["bn1.running_mean"] - (w * b.view(1, -1, 1, 1)).sum((1, 2, 3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))
    a = p.parse_args(argv)
    if not os.path.isfile(a.src):
        print(f"refold_input_norm.py: error: {a.src}: file not found (a ResNet-20 state dict)", file=sys.stderr)
        return 2
    from mpqc.compiler.data import CIFAR10_MEAN, CIFAR10_STD, load_data
    from mpqc.compiler.train import evaluate
    from mpqc.compiler.zoo import resnet20

    model = resnet20()
    model.load_state_dict(refold(torch.load(a.src, map_location="cpu", weights_only=True), OLD_MEAN, OLD_STD,
                                 CIFAR10_MEAN, CIFAR10_STD))
    model.eval()
    acc = evaluate(model, load_data(f"cifar10:{a.data}", seed=0).val, batch_size=500)
    tmp = f"{a.dst}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, a.dst)  # no half-written file under the final name
    print(f"{a.dst}: {acc:.2f} % on the CIFAR-10 test split with the published statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
