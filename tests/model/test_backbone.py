"""Backbone: official parameter layout, forward contracts, feature capture, bad input."""

import pytest
import torch
import torch.nn.functional as F

from repdyn.model.backbone import build_model, get_2d_sincos_pos_embed, model_config, registry_names


def official_layout(depth, hidden, patch, in_ch, out_ch, num_classes, input_size, mlp_ratio=4.0):
    """The state-dict layout of facebookresearch/DiT models.py, written out from its architecture
    description (timm PatchEmbed / Attention / Mlp, adaLN-Zero blocks, final layer)."""
    tokens = (input_size // patch) ** 2
    mlp = int(hidden * mlp_ratio)
    layout = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return layout


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dit_xl2_matches_official_layout():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    expected = official_layout(28, 1152, 2, 4, 8, 1000, 32)
    assert shapes(model) == expected
    assert len(expected) == 292
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # DiT-XL/2's published count


def test_sit_xl2_layouts():
    with torch.device("meta"):
        repa_sra = build_model("SiT-XL/2")  # REPA / SRA: no learned sigma
        willisma = build_model("SiT-XL/2", learn_sigma=True)  # willisma/SiT: same as DiT-XL/2
    assert shapes(repa_sra) == official_layout(28, 1152, 2, 4, 4, 1000, 32)
    assert shapes(willisma) == official_layout(28, 1152, 2, 4, 8, 1000, 32)


@pytest.mark.parametrize("name,depth,hidden,heads", [("SiT-B/2", 12, 768, 12), ("DiT-L/4", 24, 1024, 16),
                                                     ("SiT-S/8", 12, 384, 6)])
def test_registry_sizes(name, depth, hidden, heads):
    cfg = model_config(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, hidden, heads)
    assert name in registry_names()


def test_method_parts_have_clear_names():
    m = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=3, long_skip=True, sra_head=True)
    keys = set(m.state_dict())
    assert {"ap_head.linear1.weight", "ap_head.linear2.weight"} <= keys
    assert {"skip_fusions.0.norm.weight", "skip_fusions.0.linear.weight"} <= keys
    assert len(m.skip_fusions) == m.depth // 2


def test_init_is_adaln_zero_and_pos_embed_sincos():
    m = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=3)
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in m.blocks)
    pos = torch.from_numpy(get_2d_sincos_pos_embed(m.config.hidden_size, 4)).float()
    torch.testing.assert_close(m.pos_embed[0], pos)
    assert not m.pos_embed.requires_grad
    x = torch.randn(2, 1, 16, 16)
    out = m(x, torch.rand(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    m = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=3, depth=4, long_skip=True, sra_head=True)
    with torch.no_grad():  # break adaLN-Zero symmetry so blocks do something
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def test_features_and_early_exit_match_full_forward(tiny):
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])
    f = tiny.forward_features(x, t, y, blocks=[1, 2, 3, 4], project_block=2)
    assert f.out.shape == (3, 1, 16, 16)
    early = tiny.block_features(x, t, y, [1, 3])
    torch.testing.assert_close(early[3], f.blocks[3])
    torch.testing.assert_close(f.head, tiny.ap_head(f.blocks[2]))
    # the hookable module for a deep block of a long-skip model is its fusion
    assert tiny.block_output_module(4) is tiny.skip_fusions[1]
    assert tiny.block_output_module(1) is tiny.blocks[0]


def test_label_dropout_only_when_asked(tiny):
    tiny.train()
    x, t, y = torch.randn(64, 1, 16, 16), torch.rand(64), torch.zeros(64, dtype=torch.long)
    a = tiny(x, t, y, drop_labels=False)
    b = tiny(x, t, y, drop_labels=False)
    torch.testing.assert_close(a, b)
    dropped = tiny.y_embedder.drop(torch.zeros(10_000, dtype=torch.long))
    assert 0.08 < (dropped == 3).float().mean() < 0.12  # p = 0.1 to the null class (index 3)


def test_bad_input_messages(tiny):
    with pytest.raises(ValueError, match="expects input"):
        tiny(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        tiny.block_features(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]), [5])
    with pytest.raises(ValueError, match="unknown model"):
        build_model("SiT-Q/2")
    with pytest.raises(ValueError, match="even depth"):
        build_model("SiT-T/4", depth=5, long_skip=True)
    with pytest.raises(ValueError, match="unknown model field"):
        build_model("SiT-T/4", width=3)


def test_long_skip_layernorm_eps_is_the_official_1e6():
    torch.manual_seed(0)
    m = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=3, depth=4, long_skip=True)
    fusion = m.skip_fusions[0]
    assert fusion.norm.eps == 1e-6
    d = m.config.hidden_size
    with torch.no_grad():
        fusion.norm.weight.normal_(1, 0.1)
        fusion.norm.bias.normal_(0, 0.1)
        deep, shallow = 1e-3 * torch.randn(2, 5, d), 1e-3 * torch.randn(2, 5, d)  # variance ~ eps
        cat = torch.cat([deep, shallow], dim=-1)

        def manual(eps):
            h = F.layer_norm(cat, (2 * d,), fusion.norm.weight, fusion.norm.bias, eps)
            return F.linear(h, fusion.linear.weight, fusion.linear.bias)

        out = fusion(deep, shallow)
        torch.testing.assert_close(out, manual(1e-6))
        assert (out - manual(1e-5)).abs().max() > 1e-2  # the eps matters at this scale
