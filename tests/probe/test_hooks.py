"""repdyn.probe.hooks: capture, pooling in the hook, early stop, hooks always removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repdyn.probe.hooks import BlockCapture, capture_blocks, pool_tokens
from repdyn.model.backbone import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**kw):
    torch.manual_seed(0)
    m = build_model("SiT-T/8", input_size=32, in_channels=1, num_classes=10, depth=4, hidden_size=64, **kw).eval()
    # adaLN-Zero makes a fresh model's blocks the identity; randomise so blocks differ.
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 32, 32, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def _n_hooks(m):
    return sum(len(mod._forward_hooks) for mod in m.modules())


def test_hooks_removed_after_exception_in_body_and_in_forward():
    m = _model()
    x, t, y = _inputs()
    with pytest.raises(RuntimeError, match="boom"):
        with BlockCapture(m, [1, 3]):
            assert _n_hooks(m) == 2
            raise RuntimeError("boom")
    assert _n_hooks(m) == 0
    def explode(*a):
        raise FloatingPointError("block 2 blew up")

    bad = m.blocks[1].register_forward_hook(explode)  # the forward itself fails between captured blocks
    with pytest.raises(FloatingPointError):
        with BlockCapture(m, [1, 3]) as cap:
            m(x, t, y)
    bad.remove()
    assert _n_hooks(m) == 0 and 1 in cap.outputs and 3 not in cap.outputs
    with BlockCapture(m, [4]) as cap:  # normal early stop
        m(x, t, y)
    assert cap.stopped and _n_hooks(m) == 0


def test_early_exit_equals_full_forward_and_skips_the_rest():
    m = _model()
    x, t, y = _inputs()
    calls = []
    h = m.final_layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = m.forward_features(x, t, y, drop_labels=False, blocks=[1, 2, 3, 4]).blocks
        calls.clear()
        with BlockCapture(m, [2, 3]) as cap:
            m(x, t, y, drop_labels=False)
        assert not calls  # final layer never ran: the forward stopped after block 3
        m(x, t, y, drop_labels=False)
    h.remove()
    assert calls == [1]  # and the model is whole again once the capture is over
    for k in (2, 3):
        torch.testing.assert_close(cap.outputs[k], full[k].mean(1), rtol=0, atol=0)
    assert 4 not in cap.outputs and cap.outputs[2].shape == (6, 64)
    assert not torch.allclose(cap.outputs[2], cap.outputs[3])


def test_block_zero_is_the_input_embedding_and_stops_early():
    """Block 0 = patch embedding + position embedding, the stream entering block 1 (the floor)."""
    m = _model()
    x, t, y = _inputs()
    ran = []
    h = m.blocks[0].register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad(), BlockCapture(m, [0], pooling="tokens") as cap:
        m(x, t, y, drop_labels=False)
    h.remove()
    assert not ran  # stopped before block 1 ran
    with torch.no_grad():
        ref = m.x_embedder(x) + m.pos_embed
    torch.testing.assert_close(cap.outputs[0], ref, rtol=0, atol=0)
    assert _n_hooks(m) == 0 and sum(len(mod._forward_pre_hooks) for mod in m.modules()) == 0
    with torch.no_grad(), BlockCapture(m, [0, 2]) as both:
        m(x, t, y, drop_labels=False)
    torch.testing.assert_close(both.outputs[0], ref.mean(1), rtol=0, atol=0)
    assert set(both.outputs) == {0, 2}


def test_long_skip_blocks_are_the_fused_stream():
    m = _model(long_skip=True)
    x, t, y = _inputs()
    with torch.no_grad():
        ref = m.block_features(x, t, y, [1, 3, 4])
        pooled, tokens = capture_blocks(m, [1, 3, 4], lambda: m(x, t, y, drop_labels=False), pooling="tokens")
    for k in (1, 3, 4):
        torch.testing.assert_close(pooled[k], ref[k], rtol=0, atol=0)


def test_pooling_options_and_keep_tokens():
    m = _model()
    x, t, y = _inputs()
    with torch.no_grad():
        full = m.block_features(x, t, y, [2])[2]  # (6, 16, 64)
        with BlockCapture(m, [2], pooling="spatial2", keep_tokens=2) as cap:
            m(x, t, y, drop_labels=False)
    grid = full.transpose(1, 2).reshape(6, 64, 4, 4)
    expect = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(6, 4 * 64)
    torch.testing.assert_close(cap.outputs[2], expect)
    torch.testing.assert_close(cap.tokens[2], full[:2])
    assert pool_tokens(full, "tokens").shape == (6, 16, 64)
    torch.testing.assert_close(pool_tokens(full, "spatial1"), full.mean(1))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_tokens(full, "max")
    with pytest.raises(ValueError, match="spatial8"):
        pool_tokens(full, "spatial8")


def test_block_out_of_range_is_a_clear_error():
    m = _model()
    with pytest.raises(ValueError, match=r"block 5 is out of range.*1\.\.4"):
        BlockCapture(m, [1, 5])
    assert _n_hooks(m) == 0
