"""Data sets named by ``--data SPEC``, split reproducibly into train / calibration / validation.

SPEC: ``digits`` (ships with scikit-learn), ``cifar10:DIR`` (npz shards as in shared/data/cifar10),
``imagefolder:DIR`` (one sub-folder per class, each picture resized to the model's input size), ``npz:FILE``
(arrays ``x`` and ``y``: images (N, C, H, W) or (N, H, W, C), and also features (N, F), sequences (N, C, L)
for a Conv1d model, volumes (N, C, D, H, W)). Inputs become float tensors, normalised per channel (axis 1;
per feature for (N, F)) with statistics of the training split; CIFAR-10 uses the full training split's
published statistics, so a subset (``limit``, a reduced copy of the shards) sees the same inputs as the model
trained on all of it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mpqc.errors import UserError, first_line


@dataclass
class DataSplits:
    """Train, calibration and validation sets (tensor data sets of (x, label)) and what they hold."""

    name: str
    train: TensorDataset
    calib: TensorDataset
    val: TensorDataset
    num_classes: int
    augment: str = "none"  # "crop_flip" for CIFAR-style training augmentation

    @property
    def input_shape(self) -> list[int]:
        return [1, *self.train.tensors[0].shape[1:]]

    def fingerprint(self) -> str:
        """A content hash of the three splits (for caches and manifests)."""
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for ds in (self.train, self.calib, self.val):
            for t in ds.tensors:
                h.update(str(tuple(t.shape)).encode())
                h.update(t[: min(len(t), 256)].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class TensorBatches:
    """Mini-batches of a :class:`TensorDataset` cut by indexing whole tensors, optionally from a copy on ``device``.

    A ``DataLoader`` fetches and collates sample by sample: on a GPU that costs more than a ResNet-20 training
    step, so the data set is indexed in one go per batch instead (and kept on the device when asked). The order
    is the ``sampler``'s when one is given (``DistributedSampler``: call ``set_epoch`` as usual), else a seeded
    permutation per pass (``shuffle``), else the stored order. Batches are tuples like a DataLoader's.
    """

    def __init__(self, ds: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, sampler=None, device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.dataset = ds
        self.tensors = tuple(t.to(device) if device is not None else t for t in ds.tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sampler = sampler
        self._gen = torch.Generator().manual_seed(seed)

    def _count(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)

    def __len__(self) -> int:
        n, b = self._count(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = self._count()
        if self.sampler is not None:
            order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        elif self.shuffle:
            order = torch.randperm(n, generator=self._gen)
        else:
            order = None
        dev = self.tensors[0].device
        if order is not None:
            order = order.to(dev)
        b = self.batch_size
        for i in range(len(self)):
            if order is None:
                yield tuple(t[i * b:(i + 1) * b] for t in self.tensors)
            else:
                idx = order[i * b:(i + 1) * b]
                yield tuple(t[idx] for t in self.tensors)


def make_loader(ds, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    """Batches of ``ds``: :class:`TensorBatches` for tensor data sets in stored order, a ``DataLoader`` otherwise.

    Shuffled loaders stay DataLoaders so that seeded training runs keep the sample order they always had.
    """
    if isinstance(ds, TensorDataset) and not shuffle:
        return TensorBatches(ds, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)


def _split(x: np.ndarray, y: np.ndarray, *, val_frac: float, calib: int, seed: int, test=None):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    if test is None:
        n_val = max(1, int(round(len(x) * val_frac)))
        val_idx, train_idx = idx[:n_val], idx[n_val:]
        xv, yv = x[val_idx], y[val_idx]
    else:
        train_idx = idx
        xv, yv = test
    xt, yt = x[train_idx], y[train_idx]
    return (xt, yt), (xt[:calib], yt[:calib]), (xv, yv)


def _check(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) == 0:
        raise UserError(f"{what} holds no samples")
    if len(x) != len(y):
        raise UserError(f"{what}: {len(x)} inputs but {len(y)} labels; they must match")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{what}: labels must be a 1-D integer array")
    if y.min() < 0:
        raise UserError(f"{what}: labels must be >= 0 (found {int(y.min())})")
    if not 2 <= x.ndim <= 5:
        raise UserError(f"{what}: inputs must be (N, F) features, (N, C, L) sequences, (N, C, H, W) or (N, H, W, C) "
                        f"images or (N, C, D, H, W) volumes; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise UserError(f"{what}: inputs contain NaN or Inf")


# Per-channel mean and std of all 50,000 CIFAR-10 training images scaled to [0, 1] (the widely quoted values;
# shared/data/cifar10/SOURCE.md checks them against the stored pixels).
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)


def _to_splits(name, x, y, *, seed, calib, val_frac=0.15, test=None, num_classes=None, augment="none",
               stats=None, divide=1.0):
    """Split, scale (``x / divide``: 8-bit pixels stay 8-bit until here) and normalise into float32 tensors.

    Each split is converted once and normalised in place: full CIFAR-10 as float32 is 0.74 GB, and the
    expression form made three such temporaries (a compile worker peaked at 2.8 GB to hold 0.74).
    """
    _check(x, y, name)
    if test is not None:
        _check(*test, f"{name} (test split)")
    tr, _, va = _split(x, y, val_frac=val_frac, calib=calib, seed=seed, test=test)

    def floats(a: np.ndarray) -> np.ndarray:  # a float32 copy in the input's memory layout
        out = a.astype(np.float32)
        if divide != 1.0:
            out /= np.float32(divide)
        return out

    xtr, xva = floats(tr[0]), floats(va[0])
    if stats is not None:  # fixed statistics: the same normalisation whatever subset was loaded
        mean = np.asarray(stats[0], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(stats[1], np.float32).reshape(1, -1, 1, 1)
    else:  # accumulate in float64: a float32 sum over 50,000 CIFAR images stalls at 2**24 (mean 0.328, not 0.49)
        axes = (0, *range(2, xtr.ndim))  # per channel (axis 1); per feature for (N, F)
        mean = xtr.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
        std = (xtr.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-6).astype(np.float32)
    for a in (xtr, xva):
        a -= mean
        a /= std

    def ds(xs, ys):
        return TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)))

    k = int(num_classes or (max(int(y.max()), int(va[1].max())) + 1))
    if va[1].max() >= k:
        raise UserError(f"{name}: validation labels reach {int(va[1].max())} but the data set has {k} classes")
    return DataSplits(name, ds(xtr, tr[1]), ds(xtr[:calib].copy(order="K"), tr[1][:calib]), ds(xva, va[1]), k, augment)


def load_data(spec: str, *, seed: int = 0, calib: int = 512, limit: int | None = None,
              image_size: tuple[int, int] | None = None, input_rank: int | None = None) -> DataSplits:
    """Load and split the data set named by ``spec`` (see the module docstring). ``image_size`` (height, width):
    what an image folder's pictures are resized to, the model's input size where it is known (224 x 224 else).
    ``input_rank``: the model's input rank (batch included) where known; a 3-D npz array is (N, C, L) sequences
    for a rank-3 model and (N, H, W) one-channel images otherwise."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        if arg:
            raise UserError(f"--data {spec!r}: digits takes no argument; write --data digits")
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images[:, None, :, :] / 16.0).astype(np.float32)
        return _to_splits("digits", x, d.target.astype(np.int64), seed=seed, calib=calib, val_frac=0.2,
                          num_classes=10)
    if kind == "cifar10":
        return _load_cifar10(arg, seed=seed, calib=calib, limit=limit)
    if kind == "npz":
        if not os.path.isfile(arg):
            raise UserError(f"--data npz:{arg}: file not found; give the path of an .npz with arrays x and y")
        try:
            with np.load(arg) as f:
                if "x" not in f or "y" not in f:
                    raise UserError(f"--data npz:{arg}: the file needs arrays named x and y (has {list(f.keys())})")
                x, y = f["x"], f["y"]
        except (OSError, ValueError) as e:
            why = "it holds Python objects, not plain arrays" if "allow_pickle" in str(e) else first_line(e)
            raise UserError(f"--data npz:{arg}: not a readable npz file ({why}); save it with np.savez(FILE, x=..., "
                            "y=...) from numeric arrays") from None
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise UserError(f"--data npz:{arg}: x holds {x.dtype} values; save numeric arrays")
        x = _layout(x.astype(np.float32), input_rank)
        return _to_splits(f"npz:{os.path.basename(arg)}", x, y, seed=seed, calib=calib)
    if kind == "imagefolder":
        return _load_imagefolder(arg, seed=seed, calib=calib, size=image_size or (224, 224))
    raise UserError(f"--data {spec!r}: unknown data set; use digits, cifar10:DIR, imagefolder:DIR or npz:FILE")


def _layout(x: np.ndarray, input_rank: int | None) -> np.ndarray:
    """The model's layout: (N, H, W) gains a channel axis unless the model takes (N, C, L); (N, H, W, C) images
    become NCHW; features, sequences and volumes stay as they are."""
    if x.ndim == 3 and input_rank == 3:
        return x
    return _nchw(x)


def _nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)
    return x


def _load_cifar10(d: str, *, seed: int, calib: int, limit: int | None) -> DataSplits:
    if not os.path.isdir(d):
        raise UserError(f"--data cifar10:{d}: directory not found; give the folder of the *train*.npz and "
                        "*test*.npz shards")
    train_files = sorted(glob.glob(os.path.join(d, "*train*.npz")))
    test_files = sorted(glob.glob(os.path.join(d, "*test*.npz")))
    if not train_files or not test_files:
        raise UserError(f"--data cifar10:{d}: expected *train*.npz shards and a *test*.npz file there")

    def read(files):
        xs, ys = [], []
        for f in files:
            with np.load(f) as z:
                xk = next(k for k in z.files if k.lower() in ("x", "images", "data"))
                yk = next(k for k in z.files if k.lower() in ("y", "labels", "label"))
                xs.append(z[xk])
                ys.append(z[yk])
        return np.concatenate(xs), np.concatenate(ys).astype(np.int64)

    x, y = read(train_files)
    xt, yt = read(test_files)
    if limit:  # a seeded random subset: the stored test split is sorted by label
        rng = np.random.default_rng(seed)
        tr = rng.permutation(len(x))[:limit]
        te = rng.permutation(len(xt))[: max(1, limit // 5)]
        x, y, xt, yt = x[tr], y[tr], xt[te], yt[te]
    raw = x.dtype == np.uint8  # 8-bit pixels: the published statistics apply
    if raw != (xt.dtype == np.uint8):  # one scale for both splits
        x, xt = x.astype(np.float32) / (255.0 if raw else 1.0), xt.astype(np.float32) / (1.0 if raw else 255.0)
    x, xt = _nchw(x), _nchw(xt)
    stats = (CIFAR10_MEAN, CIFAR10_STD) if raw and x.shape[1] == 3 else None
    return _to_splits("cifar10", x, y, seed=seed, calib=calib, test=(xt, yt), num_classes=10,
                      augment="crop_flip", stats=stats, divide=255.0 if x.dtype == np.uint8 else 1.0)


def _load_imagefolder(d: str, *, seed: int, calib: int, size: tuple[int, int] = (224, 224)) -> DataSplits:
    if not os.path.isdir(d):
        raise UserError(f"--data imagefolder:{d}: directory not found; give a folder with one subfolder of "
                        "pictures per class")
    classes = sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
    if not classes:
        npz = sorted(e for e in os.listdir(d) if e.endswith(".npz"))
        fix = (f"it holds {npz[0]}: use --data npz:{os.path.join(d, npz[0])}" if npz else
               "put each class's images in a sub-folder named after the class")
        raise UserError(f"--data imagefolder:{d}: no class sub-folders found; {fix}")
    from PIL import Image

    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(d, c))):
            try:
                img = Image.open(os.path.join(d, c, f)).convert("RGB").resize((size[1], size[0]))  # PIL: (w, h)
            except OSError:
                continue
            xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(i)
    if not xs:
        raise UserError(f"--data imagefolder:{d}: no readable images; put the pictures (JPEG, PNG, ...) in one "
                        "subfolder per class")
    return _to_splits("imagefolder", np.stack(xs), np.array(ys, dtype=np.int64), seed=seed, calib=calib,
                      num_classes=len(classes))


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crops (4-pixel padding) and horizontal flips, the standard CIFAR recipe."""
    if kind != "crop_flip":
        return x
    n, _, h, w = x.shape
    dev = x.device
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    # the offsets come from the (CPU) generator wherever x lives: the same draws on every device
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    # one copy to the device (on CUDA each blocking copy waits for the device): rows, columns and flips together
    index = torch.cat([dy[:, None] + torch.arange(h)[None], dx[:, None] + torch.arange(w)[None], flip[:, None]], 1)
    index = index.to(dev)
    rows, cols, flip = index[:, :h], index[:, h:h + w], index[:, h + w].bool()
    out = pad[torch.arange(n, device=dev)[:, None, None, None],
              torch.arange(x.shape[1], device=dev)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)
