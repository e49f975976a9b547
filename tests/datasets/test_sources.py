"""Datasets (Fashion-MNIST IDX, digits, image folder, REPA latents) and the resumable order."""

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from repdyn.datasets.sources import FASHION_MNIST_DIR, ResumableBatchSampler, make_dataset

HAVE_FMNIST = Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST and os.environ.get("CI") != "true",
                                  reason="Debian package dataset-fashion-mnist not installed (make data)")


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_pads_and_scales(tmp_path, monkeypatch):
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[0, 0, 0], imgs[1, 27, 27] = 255, 128
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.array([0, 5, 9]))
    monkeypatch.setenv("REPDYN_FASHION_MNIST", str(tmp_path))
    ds = make_dataset("fashion-mnist", "test")
    assert len(ds) == 3 and ds.channels == 1 and ds.image_size == 32 and ds.num_classes == 10
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x[0, 2, 2] == 1.0 and x[0, 0, 0] == -1.0 and y == 0
    xb, yb = ds.get_batch(torch.tensor([1, 2]))
    assert xb[0, 0, 29, 29] == pytest.approx(128 / 127.5 - 1, abs=1e-6) and yb.tolist() == [5, 9]


def test_truncated_idx_is_an_error(tmp_path, monkeypatch):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[:-100]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3))
    monkeypatch.setenv("REPDYN_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ValueError, match="truncated"):
        make_dataset("fashion-mnist")


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("REPDYN_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("imagenet")


@needs_fmnist
def test_fashion_mnist_official_split():
    tr, te = make_dataset("fashion-mnist", "train"), make_dataset("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000)
    assert tr.images.shape == (60000, 1, 32, 32) and tr.images.dtype == torch.uint8
    assert torch.bincount(te.labels).tolist() == [1000] * 10


def test_digits_fallback():
    tr, te = make_dataset("digits", "train"), make_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and tr.image_size == 8
    x, _ = tr[0]
    assert x.min() >= -1 and x.max() <= 1


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, color in (("cat", 255), ("dog", 0)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (color, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    ds = make_dataset(f"folder:{tmp_path}", "test", image_size=16)
    assert len(ds) == 4 and ds.class_names == ["cat", "dog"] and ds.channels == 3
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x[0].mean() == pytest.approx(1.0) and y == 0


def _latents(root, n: int) -> None:
    (root / "00000").mkdir(parents=True)
    labels = []
    for i in range(n):
        mom = np.concatenate([np.full((4, 4, 4), float(i)), np.full((4, 4, 4), 0.5)]).astype(np.float32)
        np.save(root / "00000" / f"img{i:08d}.npy", mom)
        labels.append([f"00000/img{i:08d}.npy", i % 3])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))


def test_latents_without_test_split_never_leak(tmp_path):
    """No PATH/test/vae-sd: train and test are a disjoint seeded cut, warned about and recorded."""
    _latents(tmp_path / "vae-sd", 40)
    with pytest.warns(UserWarning, match="no test split"):
        tr, te = make_dataset(f"latents:{tmp_path}", "train"), make_dataset(f"latents:{tmp_path}", "test")
    assert (len(tr), len(te)) == (36, 4) and not set(tr.files) & set(te.files)
    assert tr.split_rule == te.split_rule and "not an official split" in te.split_rule
    assert len(make_dataset(f"latents:{tmp_path}", "train", holdout_cut=False)) == 40  # the trainer's view
    _latents(tmp_path / "test" / "vae-sd", 5)  # an official test split wins
    te = make_dataset(f"latents:{tmp_path}", "test")
    assert len(te) == 5 and te.split_rule == "official"


def test_image_folder_without_split_is_cut_disjointly(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (25 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    with pytest.warns(UserWarning, match="no test split"):
        tr, te = make_dataset(f"folder:{tmp_path}", "train"), make_dataset(f"folder:{tmp_path}", "test")
    assert len(tr) + len(te) == 20 and not {f for f, _ in tr.files} & {f for f, _ in te.files}
    assert te.split_rule != "official"


def test_latents_layout_samples_posterior(tmp_path):
    _latents(tmp_path / "vae-sd", 3)
    ds = make_dataset(f"latents:{tmp_path}", holdout_cut=False)
    assert (ds.channels, ds.image_size, ds.num_classes, len(ds)) == (4, 4, 3, 3)
    moments, y = ds.get_batch(torch.tensor([2]))  # moments mean 2.0
    g = torch.Generator().manual_seed(0)
    z = ds.finalize(moments.repeat(4000, 1, 1, 1), g)
    assert z.mean().item() == pytest.approx(2 * 0.18215, abs=0.01)
    assert z.std().item() == pytest.approx(0.5 * 0.18215, abs=0.01)


def test_sampler_resumes_mid_epoch_and_shards():
    full = ResumableBatchSampler(100, 10, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(13)]  # crosses an epoch boundary (10 batches per epoch)
    resumed = ResumableBatchSampler(100, 10, seed=3)
    resumed.load_state_dict({"epoch": 0, "position": 7})
    it2 = iter(resumed)
    for a in first[7:]:
        assert torch.equal(a, next(it2))
    r0, r1 = iter(ResumableBatchSampler(100, 5, seed=3, rank=0, world_size=2)), iter(
        ResumableBatchSampler(100, 5, seed=3, rank=1, world_size=2))
    assert torch.equal(torch.cat([next(r0), next(r1)]), first[0])  # two ranks = one global batch
    with pytest.raises(ValueError, match="larger than the dataset"):
        ResumableBatchSampler(10, 8, world_size=2)


def _folder(root, mode: str, n: int = 2, corrupt: str | None = None):
    from PIL import Image

    for split in ("train", "test"):
        for c, value in (("cat", 200), ("dog", 50)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new(mode, (12, 12), value if mode == "L" else (value, 0, 255)).save(root / split / c / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"this is not a png")


def test_corrupt_image_is_one_line_naming_the_file(tmp_path):
    _folder(tmp_path, "RGB", corrupt="train/dog/1.png")
    ds = make_dataset(f"folder:{tmp_path}", "train", image_size=8)
    with pytest.raises(ValueError, match=r"cannot read image .*dog/1\.png \(not an image PIL can read\)") as e:
        ds.get_batch(torch.arange(len(ds)))
    assert "\n" not in str(e.value)


def test_folder_channels_follow_the_model(tmp_path):
    """A grayscale folder feeds a one-channel model and an RGB one; RGB images convert to grayscale."""
    _folder(tmp_path / "gray", "L")
    _folder(tmp_path / "rgb", "RGB")
    x1, _ = make_dataset(f"folder:{tmp_path / 'gray'}", "test", image_size=8, channels=1)[0]
    assert x1.shape == (1, 8, 8) and x1.mean() == pytest.approx(200 / 127.5 - 1, abs=1e-6)
    x3, _ = make_dataset(f"folder:{tmp_path / 'gray'}", "test", image_size=8, channels=3)[0]
    assert x3.shape == (3, 8, 8) and torch.equal(x3[0], x3[1]) and torch.equal(x3[0], x1[0])
    ds = make_dataset(f"folder:{tmp_path / 'rgb'}", "test", image_size=8, channels=1)
    assert ds.channels == 1 and ds.get_batch(torch.arange(4))[0].shape == (4, 1, 8, 8)
    assert make_dataset(f"folder:{tmp_path / 'rgb'}", "test").channels == 3  # no model: RGB, as before
    with pytest.raises(ValueError, match="cannot be converted to the 4 channel.*latents:PATH"):
        make_dataset(f"folder:{tmp_path / 'rgb'}", "test", channels=4)


def test_gray_arrays_repeat_for_rgb_models_and_latents_do_not_convert(tmp_path):
    tr1, tr3 = make_dataset("digits", "test"), make_dataset("digits", "test", channels=3)
    assert tr3.channels == 3 and torch.equal(tr3[0][0][2], tr1[0][0][0])
    with pytest.raises(ValueError, match="cannot be converted to the 4 channel"):
        make_dataset("digits", "test", channels=4)
    _latents(tmp_path / "vae-sd", 4)
    assert make_dataset(f"latents:{tmp_path}", holdout_cut=False, channels=4).channels == 4
    with pytest.raises(ValueError, match="4 latent channel.*cannot be converted to the 1 channel.*images"):
        make_dataset(f"latents:{tmp_path}", holdout_cut=False, channels=1)


def test_latent_of_another_shape_names_file_and_shapes(tmp_path):
    _latents(tmp_path / "vae-sd", 4)
    np.save(tmp_path / "vae-sd" / "00000" / "img00000002.npy", np.zeros((8, 2, 2), np.float32))
    ds = make_dataset(f"latents:{tmp_path}", holdout_cut=False)
    with pytest.raises(ValueError, match=r"img00000002\.npy has shape \(8, 2, 2\), expected \(8, 4, 4\)"):
        ds.get_batch(torch.arange(4))
    (tmp_path / "vae-sd" / "00000" / "img00000002.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot read latent .*img00000002\.npy \(not a \.npy file\)"):
        ds.get_batch(torch.arange(4))
