"""TensorBatches: the vectorised batcher must hand out exactly what a DataLoader would."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mpqc.compiler.data import TensorBatches, augment_batch, make_loader


def _ds(n=37):
    return TensorDataset(torch.randn(n, 3, 4, 4), torch.arange(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_stored_order_batches_match_dataloader(drop_last):
    ds = _ds()
    ref = DataLoader(ds, batch_size=8, drop_last=drop_last)
    ours = make_loader(ds, 8, drop_last=drop_last)
    assert isinstance(ours, TensorBatches)
    a, b = list(ref), list(ours)
    assert len(a) == len(b) == len(ours) == (4 if drop_last else 5)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shuffled_batches_are_seeded_permutations_new_each_pass():
    ds = _ds()
    tb = TensorBatches(ds, 8, shuffle=True, seed=3)
    first, second = torch.cat([y for _, y in tb]), torch.cat([y for _, y in tb])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(37))
    assert not torch.equal(first, second)
    again = torch.cat([y for _, y in TensorBatches(ds, 8, shuffle=True, seed=3)])
    assert torch.equal(first, again)
    x, y = next(iter(tb))
    assert torch.equal(x, ds.tensors[0][y])  # images travel with their labels


def test_batches_follow_a_distributed_sampler_per_epoch():
    ds = _ds(40)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    tb = TensorBatches(ds, 6, sampler=sampler, drop_last=True)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        ys = torch.cat([y for _, y in tb])
        assert ys.tolist() == order[: len(tb) * 6]
        seen.append(ys.tolist())
    assert seen[0] != seen[1]


def test_batches_reject_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(_ds(), 0)


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        crops = [pad[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    again = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert augment_batch(x, "none") is x


def _write_cifar(d, rng, n_train, pixels):
    d.mkdir()
    x = pixels(rng, (n_train, 32, 32, 3))
    np.savez(d / "train-0.npz", x=x, y=rng.integers(0, 10, n_train).astype(np.uint8))
    np.savez(d / "test.npz", x=pixels(rng, (40, 32, 32, 3)), y=np.arange(40, dtype=np.uint8) % 10)
    return x


def test_cifar10_subsets_share_the_published_normalisation(tmp_path):
    """A reduced copy of the shards must feed the model the inputs it was trained on (full-split statistics)."""
    from mpqc.compiler.data import CIFAR10_MEAN, CIFAR10_STD, load_data

    rng = np.random.default_rng(0)
    dark = lambda r, shape: r.integers(0, 60, shape, dtype=np.uint8)  # noqa: E731 - far from CIFAR's mean
    _write_cifar(tmp_path / "a", rng, 64, dark)
    small = load_data(f"cifar10:{tmp_path / 'a'}", seed=0)
    with np.load(tmp_path / "a" / "test.npz") as z:
        raw = z["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    want = (raw - np.reshape(CIFAR10_MEAN, (1, 3, 1, 1))) / np.reshape(CIFAR10_STD, (1, 3, 1, 1))
    np.testing.assert_allclose(small.val.tensors[0].numpy(), want, rtol=1e-5, atol=1e-5)
    # limit= picks a subset, the normalisation stays the same
    sub = load_data(f"cifar10:{tmp_path / 'a'}", seed=0, limit=50)
    assert len(sub.val) == 10
    full_val = small.val.tensors[0].numpy().reshape(40, -1)
    for row in sub.val.tensors[0].numpy().reshape(10, -1):
        assert np.isclose(full_val, row, atol=1e-6).all(axis=1).any()


def test_float_cifar10_shards_keep_their_own_statistics(tmp_path):
    """Float pixels may be pre-scaled any way: the published uint8 statistics would be wrong for them."""
    from mpqc.compiler.data import load_data

    rng = np.random.default_rng(1)
    x = _write_cifar(tmp_path / "f", rng, 64, lambda r, shape: (r.random(shape) * 4.0 - 2.0).astype(np.float32))
    tr = load_data(f"cifar10:{tmp_path / 'f'}", seed=0).train.tensors[0].numpy()
    np.testing.assert_allclose(tr.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(tr.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    assert x.min() < -1.9  # the data really was on another scale


def test_statistics_do_not_stall_on_large_float32_sets():
    """A float32 sum stops growing at 2**24 (CIFAR-10's 51 M pixel values averaged 0.328 instead of 0.49)."""
    from mpqc.compiler.data import _to_splits

    # images stored NHWC and viewed NCHW, as the loaders do: numpy then sums each channel one value at a time
    x = np.full((250, 64, 64, 3), 1000.0, np.float32).transpose(0, 3, 1, 2)
    x[::2] += 250.0
    y = np.arange(250) % 10
    d = _to_splits("big", x, y, seed=0, calib=8, val_frac=0.2)
    t = d.train.tensors[0]
    assert abs(float(t.mean())) < 1e-3
    assert abs(float(t.std()) - 1.0) < 1e-2


def test_loading_8_bit_images_holds_little_more_than_the_float_copy_it_returns(tmp_path):
    """CIFAR-10's 60,000 images are 0.74 GB as float32; loading them made three more such arrays on the way (a
    compile worker peaked at 2.8 GB). Pixels now stay 8-bit until each split is converted once and normalised
    in place, so the peak is the returned floats plus the 8-bit input and a split of it."""
    import tracemalloc

    from mpqc.compiler.data import load_data

    rng = np.random.default_rng(0)
    _write_cifar(tmp_path / "c", rng, 4000, lambda r, shape: r.integers(0, 256, shape, dtype=np.uint8))
    tracemalloc.start()
    try:
        d = load_data(f"cifar10:{tmp_path / 'c'}", seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = sum(t.numel() * t.element_size() for ds in (d.train, d.calib, d.val) for t in ds.tensors)
    assert peak < 1.6 * kept, (peak / 2**20, kept / 2**20)
    t = d.train.tensors[0]
    assert t.dtype == torch.float32 and t.stride()[1] == 1  # float32, in the stored (channels-last) layout
    assert d.calib.tensors[0].stride() == t.stride()


def test_an_image_folder_without_class_folders_says_what_to_do(tmp_path):
    from mpqc.compiler.data import load_data
    from mpqc.errors import UserError

    with pytest.raises(UserError, match="sub-folder named after the class"):
        load_data(f"imagefolder:{tmp_path}")
    np.savez(tmp_path / "samples.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4))
    with pytest.raises(UserError, match=f"use --data npz:{tmp_path / 'samples.npz'}"):
        load_data(f"imagefolder:{tmp_path}")


def test_an_image_folder_is_read_at_the_models_input_size(tmp_path):
    """A 16 x 16 model gets 16 x 16 pictures from an image folder (it used to get 224 x 224, whatever it took: a
    small model then either refused the data or ran on stretched pictures), and the default stays 224."""
    from PIL import Image
    from torch import nn

    import mpqc
    from mpqc.compiler.data import load_data

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "pics" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "pics" / c / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'pics'}"
    assert load_data(spec).val.tensors[0].shape[1:] == (3, 224, 224)
    assert load_data(spec, image_size=(16, 12)).val.tensors[0].shape[1:] == (3, 16, 12)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    torch.save(model, tmp_path / "m.pt")
    mpqc.compile(str(tmp_path / "m.pt"), trust_pickle=True, input_shape="1,3,16,16", target="generic", data=spec,
                 out=str(tmp_path / "out"), avg_bits="W4A4", stop_after="capture", progress=False)
    import json

    ir = json.loads((tmp_path / "out" / "ir.json").read_text())
    assert ir["meta"]["input_shapes"] == [[1, 3, 16, 16]]  # before: "samples of shape [3, 224, 224] do not fit"


@pytest.mark.parametrize("shape,rank,laid_out", [
    ((60, 12), None, (12,)),                    # features
    ((60, 4, 32), 3, (4, 32)),                  # sequences for a Conv1d model
    ((60, 8, 8), None, (1, 8, 8)),              # one-channel images
    ((60, 8, 8), 4, (1, 8, 8)),
    ((60, 8, 8, 3), None, (3, 8, 8)),           # channel-last images
    ((60, 2, 4, 6, 6), 5, (2, 4, 6, 6)),        # volumes
])
def test_npz_data_of_every_rank_is_laid_out_for_the_model_and_normalised_per_channel(tmp_path, shape, rank, laid_out):
    """npz data had to be images: (N, F) features and Conv1d sequences were refused or made one-channel images."""
    from mpqc.compiler.data import load_data

    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * np.arange(1, shape[-1] + 1) + 5).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(shape[0]) % 3)
    d = load_data(f"npz:{tmp_path / 'd.npz'}", calib=16, input_rank=rank)
    xt = d.train.tensors[0]
    assert tuple(xt.shape[1:]) == laid_out and d.input_shape == [1, *laid_out]
    axes = (0, *range(2, xt.dim()))
    torch.testing.assert_close(xt.mean(axes), torch.zeros(xt.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(xt.std(axes, unbiased=False), torch.ones(xt.shape[1]), atol=1e-3, rtol=0)


def test_npz_data_without_a_sample_axis_and_more_is_one_line(tmp_path):
    from mpqc.compiler.data import load_data
    from mpqc.errors import UserError

    np.savez(tmp_path / "d.npz", x=np.arange(10.0), y=np.arange(10) % 2)
    with pytest.raises(UserError, match="features"):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_a_conv1d_model_compiles_on_sequence_data(tmp_path):
    import mpqc
    from tests.models import SequenceConv1d

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 4, 32)).astype(np.float32) + y[:, None, None]  # separable by the mean
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    torch.manual_seed(0)
    model = SequenceConv1d()
    opt = torch.optim.Adam(model.parameters(), 0.01)
    xs = torch.from_numpy((x - x.mean((0, 2), keepdims=True)) / x.std((0, 2), keepdims=True)).float()
    ys = torch.from_numpy(y)
    for _ in range(60):  # a trained float model (the data is normalised per channel, as mpqc feeds it)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    r = mpqc.compile(str(tmp_path / "m.pt"), arch="tests.models:SequenceConv1d", target="generic",
                     data=f"npz:{tmp_path / 'seq.npz'}", out=str(tmp_path / "out"), avg_bits="W4A4", samples=64,
                     epochs=1, progress=False)
    acc = r.metrics["accuracy"]
    assert acc["full precision"] > 80 and acc["exported ONNX (onnxruntime)"] > 70, acc
