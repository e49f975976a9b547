"""Shared pytest fixtures.

Checkpoints are trained once per session (a few seconds each on CPU) into a temporary folder,
so tests exercise the real trainer -> checkpoint -> loader path instead of hand-made files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_MODEL = {"depth": 4, "hidden_size": 64, "num_heads": 4}


@pytest.fixture(scope="session")
def small_encoder_root(tmp_path_factory) -> Path:
    """A $REPDYN_CACHE holding an embedded Fashion-MNIST encoder trained quickly (256 images): the
    alignment commands then find it cached instead of training the full one."""
    from repdyn.model.encoders import get_embedded_encoder

    root = tmp_path_factory.getbasetemp() / "encoder_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPDYN_CACHE", str(root))
        get_embedded_encoder("fashion-mnist", max_train=256)
    return root


@pytest.fixture
def small_encoder_cache(small_encoder_root, monkeypatch) -> Path:
    monkeypatch.setenv("REPDYN_CACHE", str(small_encoder_root))
    return small_encoder_root


def _train_tiny(preset: str, out: Path, steps: int) -> Path:
    from repdyn.training.config import resolve_config
    from repdyn.training.trainer import train

    # ema_decay 0.9: after a few dozen steps the EMA must differ from the initialisation, or
    # "EMA weights" would just be the random init.
    cfg = resolve_config(preset, overrides=dict(model_overrides=dict(TINY_MODEL), steps=steps, batch_size=32,
                                                ema_decay=0.9, out=str(out), ckpt_every=0, log_every=steps,
                                                device="cpu", seed=0))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core box: thread hand-offs cost more than they give
    try:
        path = train(cfg, quiet=True)
    finally:
        torch.set_num_threads(old)
    assert path is not None and Path(path).exists()
    return Path(path)


@pytest.fixture(scope="session")
def tiny_sit_ckpt(tmp_path_factory) -> Path:
    """A SiT-T/4 (depth 4, width 64) trained 30 steps on Fashion-MNIST; path of its checkpoint."""
    return _train_tiny("sit-tiny", tmp_path_factory.mktemp("tiny_sit"), steps=30)


@pytest.fixture(scope="session")
def tiny_dit_ckpt(tmp_path_factory) -> Path:
    """A DiT-T/4 (depth 4, width 64, learned sigma) trained 25 steps on Fashion-MNIST (its EMA at decay 0.9
    then holds 7% of the initialisation, under the 10% at which loading warns)."""
    return _train_tiny("dit-tiny", tmp_path_factory.mktemp("tiny_dit"), steps=25)


@pytest.fixture
def single_thread():
    """One intra-op thread for the duration of a test: tiny tensors on a shared 2-core box run
    several times faster without thread hand-offs. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_sra_run(tmp_path_factory) -> Path:
    """A run folder of a SiT-T/4 (depth 4, width 64) trained 30 steps with SRA, a checkpoint every
    10 steps (3 checkpoints: training dynamics, correlation across checkpoints)."""
    from repdyn.training.config import resolve_config
    from repdyn.training.trainer import train

    out = tmp_path_factory.mktemp("tiny_sra_run")
    cfg = resolve_config("sit-tiny", overrides=dict(model_overrides=dict(TINY_MODEL), method="sra", steps=30,
                                                    batch_size=16, ema_decay=0.9, out=str(out), ckpt_every=10,
                                                    log_every=10, device="cpu", seed=0))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, quiet=True)
    finally:
        torch.set_num_threads(old)
    assert len(list((out / "checkpoints").glob("*.pt"))) == 3
    return out


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder nothing can be written in, named ``ro``. Not root: a real ``chmod 0555`` folder. Root
    ignores file modes, so there the read-only file system is simulated: ``os.mkdir`` / ``os.open``
    (which ``Path.mkdir``, ``tempfile.mkstemp`` and the output locks go through) raise
    ``OSError(EROFS)`` for any path inside it, as a read-only mount would."""
    import errno
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    inside = str(ro.resolve())

    def guard(real):
        def wrapped(path, *args, **kwargs):
            p = os.path.abspath(os.fsdecode(path)) if not isinstance(path, int) else ""
            if p == inside or p.startswith(inside + os.sep):
                raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
            return real(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "mkdir", guard(os.mkdir))
    monkeypatch.setattr(os, "open", guard(os.open))
    yield ro
