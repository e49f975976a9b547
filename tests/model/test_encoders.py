"""repdyn.model.encoders: the embedded ViT (trained once, cached, not the fd classifier), specs,
precomputed feature files and their one-line errors, DINOv2 loading through timm from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repdyn.model import encoders as E

pytestmark = pytest.mark.usefixtures("single_thread")


class _Tiny:
    """A small pixel dataset with the project's interface (model-space images in [-1, 1])."""

    latent_scale = None

    def __init__(self, n: int, split: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.rand(n, 1, 32, 32, generator=g) * 0.5 - 1 + self.y.view(-1, 1, 1, 1).float() * 0.5
        self.name, self.split, self.num_classes, self.channels, self.image_size = "tiny", split, 3, 1, 32

    def __len__(self):
        return len(self.y)

    def get_batch(self, idx):
        return self.x[idx], self.y[idx]


def _make(spec, split="train"):
    return _Tiny(96 if split == "train" else 48, split, 0 if split == "train" else 1)


def test_embedded_trains_once_is_cached_and_is_not_the_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("REPDYN_CACHE", str(tmp_path))
    logs: list[str] = []
    enc = E.get_embedded_encoder("tiny", make_dataset_fn=_make, max_train=64, log=logs.append)
    assert enc.path == E.embedded_cache_path("tiny", 64) and enc.path.exists() and "encoders" in enc.path.parts
    assert enc.path.name == "embedded-vit-tiny-n64.pt" != E.embedded_cache_path("tiny").name  # never the default
    assert len(logs) == 1 and "training the embedded ViT" in logs[0]
    assert 0.0 <= enc.test_accuracy <= 1.0 and enc.info["n_train"] == 64
    # another architecture, seed and file than the classifier behind fd_<data>
    from repdyn.model.classifier import SmallCNN, classifier_cache_path

    assert isinstance(enc.model, E.TinyViT) and not isinstance(enc.model, SmallCNN)
    assert enc.info["seed"] != 0 and enc.path != classifier_cache_path("tiny")
    f = enc.features(_make("tiny", "test"), np.arange(10), batch_size=4)
    assert f.pooled.shape == (10, 64) and f.tokens.shape == (10, 64, 64)  # 8 x 8 patch grid of 32 x 32 inputs
    # second call: loaded from the cache, same weights, no training
    again = E.get_embedded_encoder("tiny", make_dataset_fn=_make, max_train=64, log=logs.append)
    assert len(logs) == 1 and again.sha == enc.sha
    g = again.features(_make("tiny", "test"), np.arange(10), batch_size=7)
    assert np.allclose(g.pooled, f.pooled, atol=1e-5) and np.allclose(g.tokens, f.tokens, atol=1e-5)


def test_specs_and_their_errors():
    assert E.parse_encoder("embedded") == ("embedded", {})
    assert E.parse_encoder("embedded:1000") == ("embedded", {"max_train": 1000})
    with pytest.raises(ValueError, match="embedded:N with N >= 100"):
        E.parse_encoder("embedded:ten")
    assert E.parse_encoder("dinov2-vitb14:/w.pth")[1]["arch"] == "vit_base_patch14_dinov2"
    assert E.parse_encoder("timm:resnet18:/r.safetensors") == ("timm", {"arch": "resnet18", "path": "/r.safetensors"})
    assert E.parse_encoder("features:/f.npz") == ("features", {"path": "/f.npz"})
    for bad, msg in [("clip", "unknown --encoder"), ("dinov2-vits14", "local weights file"),
                     ("timm:resnet18", "timm:NAME:PATH"), ("features:", "needs a .npy")]:
        with pytest.raises(ValueError, match=msg):
            E.parse_encoder(bad)


def test_precomputed_features(tmp_path):
    ds = _make("tiny", "test")  # 48 images
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(48, 5)).astype(np.float32)
    np.save(tmp_path / "p.npy", pooled)
    enc = E.load_encoder(f"features:{tmp_path / 'p.npy'}")
    f = enc.features(ds, np.array([3, 7, 40]), tokens=False)
    assert np.array_equal(f.pooled, pooled[[3, 7, 40]]) and f.tokens is None
    with pytest.raises(ValueError, match=r"pooled \(N, D\) features; token alignment needs tokens"):
        enc.features(ds, np.array([3]), tokens=True)
    # tokens keyed by an indices array (any order); pooled = mean over tokens
    toks = rng.normal(size=(4, 6, 5)).astype(np.float32)
    np.savez(tmp_path / "t.npz", features=toks, indices=np.array([40, 3, 7, 9]))
    f = E.load_encoder(f"features:{tmp_path / 't.npz'}").features(ds, np.array([3, 7, 40]))
    assert np.allclose(f.tokens, toks[[1, 2, 0]]) and np.allclose(f.pooled, toks[[1, 2, 0]].mean(1))
    from safetensors.numpy import save_file

    save_file({"features": toks, "indices": np.array([40, 3, 7, 9])}, str(tmp_path / "t.safetensors"))
    g = E.load_encoder(f"features:{tmp_path / 't.safetensors'}").features(ds, np.array([3, 7, 40]))
    assert np.allclose(g.tokens, f.tokens)
    # one-line errors
    with pytest.raises(ValueError, match="no rows for 1 of the 2 images analysed .e.g. image 5"):
        E.load_encoder(f"features:{tmp_path / 't.npz'}").features(ds, np.array([3, 5]))
    np.save(tmp_path / "short.npy", pooled[:10])
    with pytest.raises(ValueError, match="has 10 rows but the test split has 48 images"):
        E.load_encoder(f"features:{tmp_path / 'short.npy'}").features(ds, np.array([3]), tokens=False)
    np.save(tmp_path / "1d.npy", np.zeros(4))
    with pytest.raises(ValueError, match=r"expected pooled \(N, D\) or tokens \(N, T, D\), got shape \(4,\)"):
        E.load_encoder(f"features:{tmp_path / '1d.npy'}")
    np.savez(tmp_path / "badidx.npz", features=pooled, indices=np.arange(3))
    with pytest.raises(ValueError, match="one image index per row"):
        E.load_encoder(f"features:{tmp_path / 'badidx.npz'}")
    with pytest.raises(FileNotFoundError, match="features file .*missing.npy not found"):
        E.load_encoder(f"features:{tmp_path / 'missing.npy'}")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="use .npy, .npz or .safetensors"):
        E.load_encoder(f"features:{tmp_path / 'x.txt'}")


def test_missing_weights_file_is_one_line_naming_path_and_source(tmp_path):
    pytest.importorskip("timm", reason="timm not installed (pip install 'repdyn[encoders]')")
    with pytest.raises(FileNotFoundError) as e:
        E.load_encoder(f"dinov2-vits14:{tmp_path / 'dinov2_vits14_pretrain.pth'}")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "dinov2_vits14_pretrain.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in msg


@pytest.mark.slow
def test_dinov2_vits14_loads_from_a_local_file_in_timm_and_official_layout(tmp_path):
    timm = pytest.importorskip("timm", reason="timm not installed (pip install 'repdyn[encoders]')")
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False)  # the real class, 37 x 37 positions
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    official = {**sd, "mask_token": torch.zeros(1, 384)}  # the official checkpoint also holds the mask token
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    ds = _make("tiny", "test")
    out = []
    for name in ("timm.pth", "dinov2_vits14_pretrain.pth"):
        enc = E.load_encoder(f"dinov2-vits14:{tmp_path / name}")
        assert enc.name == "dinov2-vits14" and enc.size == 224
        assert torch.equal(enc.model.blocks[3].mlp.fc1.weight, ref.blocks[3].mlp.fc1.weight)
        assert tuple(enc.model.pos_embed.shape) == (1, 1 + 16 * 16, 384)  # resampled to 224 / 14 = 16
        x = enc.preprocess(ds.x[:2])
        assert x.shape == (2, 3, 224, 224)
        f = enc.features(ds, np.arange(3), batch_size=2)
        assert f.pooled.shape == (3, 384) and f.tokens.shape == (3, 256, 384) and np.isfinite(f.tokens).all()
        out.append(f.pooled)
    assert np.allclose(out[0], out[1], atol=1e-5)
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11")}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="do not fit timm model 'vit_small_patch14_dinov2'"):
        E.load_encoder(f"dinov2-vits14:{tmp_path / 'cut.pth'}")


def test_repa_encoder_names_are_the_dinov2_specs():
    assert E.parse_encoder("dinov2-vit-b:/w.pth") == ("timm", {"arch": "vit_base_patch14_dinov2", "path": "/w.pth",
                                                               "dinov2": "dinov2-vitb14"})
    assert E.parse_encoder("dinov2-vit-s:/w.pth") == E.parse_encoder("dinov2-vits14:/w.pth")


def test_a_timm_vit_is_resized_to_the_token_grid_asked_for(tmp_path):
    """REPA aligns token i with token i: a ViT is rebuilt for grid * patch pixels (positions resampled
    from the file's), the image resized to it; without a grid it keeps its pretrained size."""
    timm = pytest.importorskip("timm", reason="timm not installed (pip install 'repdyn[encoders]')")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    spec = f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pth'}"
    assert E.load_encoder(spec).size == 224
    enc = E.load_encoder(spec, token_grid=3)
    assert enc.size == 48 and tuple(enc.model.pos_embed.shape) == (1, 1 + 9, 192)
    assert torch.equal(enc.model.blocks[2].mlp.fc1.weight, ref.blocks[2].mlp.fc1.weight)
    pooled, tokens = enc.encode(_make("tiny", "test").x[:2])
    assert pooled.shape == (2, 192) and tokens.shape == (2, 9, 192)
