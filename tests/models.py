"""Small models defined for the tests: a BERT-style encoder, a DLRM-like recommender, a digits CNN, a tiny ResNet."""

from __future__ import annotations

import math

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention written with explicit matmuls (activation x activation products)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        def split(y):
            return y.view(b, t, self.heads, self.dh).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.dh)
        y = torch.matmul(att.softmax(-1), v)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, ff), nn.Linear(ff, dim)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class TinyBert(nn.Module):
    """A BERT-style encoder: token + position embeddings, N encoder layers, a classifier on token 0."""

    def __init__(self, vocab=100, dim=32, heads=4, ff=64, layers=2, seq=12, classes=3):
        super().__init__()
        self.seq = seq
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff) for _ in range(layers))
        self.cls = nn.Linear(dim, classes)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.cls(x[:, 0])

    def example_inputs(self):
        return (torch.randint(0, 100, (2, self.seq)),)


class TinyDLRM(nn.Module):
    """DLRM-like: a bottom MLP on dense features, embedding tables on sparse ones, pairwise dot interaction."""

    def __init__(self, dense=8, tables=(50, 40, 30), dim=16):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(dense, 32), nn.ReLU(), nn.Linear(32, dim), nn.ReLU())
        self.emb = nn.ModuleList(nn.Embedding(n, dim) for n in tables)
        f = len(tables) + 1
        self.top = nn.Sequential(nn.Linear(dim + f * f, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense, sparse):
        x = self.bottom(dense)
        feats = torch.stack([x] + [e(sparse[:, i]) for i, e in enumerate(self.emb)], dim=1)
        inter = torch.bmm(feats, feats.transpose(1, 2)).flatten(1)
        return self.top(torch.cat([x, inter], dim=1))

    def example_inputs(self):
        return torch.randn(4, 8), torch.randint(0, 30, (4, 3))


from mpqc.compiler.zoo import DigitsCNN  # noqa: E402,F401  (re-exported for the tests)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetTiny(nn.Module):
    """A stem, an identity block (its input is read by a conv and by the add) and a downsampling block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = ResidualBlock(8, 8, 1)
        self.block2 = ResidualBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def tiny_images(n: int, seed: int) -> torch.Tensor:
    """Random inputs for ResNetTiny (3 x 12 x 12)."""
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def resnet_tiny() -> ResNetTiny:
    """A seeded ResNetTiny in eval mode whose batch norms hold the statistics of 64 random images."""
    torch.manual_seed(0)
    m = ResNetTiny()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(tiny_images(64, 1))
    return m.eval()


def write_resnet_tiny_files(folder, n: int) -> ResNetTiny:
    """Save resnet_tiny()'s weights as tiny.pt and ``n`` random labelled uint8 images as data.npz (npz:FILE data)
    in ``folder``, for the command-line tests; returns the model."""
    import numpy as np

    model = resnet_tiny()
    torch.save(model.state_dict(), folder / "tiny.pt")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return model


class DeadBranchDigits(nn.Module):
    """A digits MLP with a branch whose output is multiplied by zero: its weights cannot matter to the loss."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        self.dead = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(x))) + 0.0 * self.dead(x)


class TwoHeadDigits(nn.Module):
    """A digits classifier that returns its logits beside an auxiliary head's, as a tuple (not what mpqc takes)."""

    input_shape = (1, 1, 8, 8)

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(64, 32), nn.Linear(32, 10), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(h), self.aux(h)


class SequenceConv1d(nn.Module):
    """A Conv1d classifier of (N, 4, 32) sequences: its input is not an image."""

    input_shape = (1, 4, 32)

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 8, 5, padding=2), nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(2))
