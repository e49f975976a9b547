"""commands/features.py: the settings every analysis command shares, parsed in one place."""

from __future__ import annotations

import pytest

from repdyn.commands.features import (FeatureSpec, cell_t, check_weights, checkpoint_columns, data_of, parse_cells,
                                      spread_blocks, weights_word)
from repdyn.model.checkpoint import load_checkpoint


def test_cells_parse_from_text_or_tuples_and_refuse_anything_else():
    assert parse_cells(["2,0.5", " 4 : 0.3 ", (6, 0.9)]) == [(2, 0.5), (4, 0.3), (6, 0.9)]
    assert parse_cells(None) == []
    for bad, why in (("4", "a cell is 'block,t'"), ("4,0.5,1", "a cell is 'block,t'"),
                     ("x,0.5", "an integer block and a numeric t")):
        with pytest.raises(ValueError, match=why):
            parse_cells([bad])


def test_weights_are_checked_before_any_file_is_read_and_named_in_titles():
    assert check_weights("ema") == "ema" and check_weights("model") == "model"
    with pytest.raises(ValueError, match="--weights must be ema or model, got 'online'"):
        check_weights("online")
    assert (weights_word("ema"), weights_word("model")) == ("EMA", "online")


def test_spread_blocks_keeps_both_ends():
    assert spread_blocks(4, 8) == [1, 2, 3, 4]
    picked = spread_blocks(28, 8)
    assert picked[0] == 1 and picked[-1] == 28 and len(picked) == 8 and picked == sorted(set(picked))


def test_the_data_and_the_checkpoint_columns_follow_the_run(tiny_sit_ckpt):
    ck = load_checkpoint(tiny_sit_ckpt)
    assert data_of(ck, FeatureSpec()) == "fashion-mnist" and data_of(ck, FeatureSpec(data="digits")) == "digits"
    cols = checkpoint_columns(ck)
    assert cols["checkpoint_sha"] == ck.sha and cols["run"] == tiny_sit_ckpt.parent.parent.name
    assert cols["weights"] == "ema" and cols["step"] == ck.step
    assert cell_t(ck, 0.5) == 0.5  # SiT: t in [0, 1]
    with pytest.raises(ValueError):
        cell_t(ck, 1.5)
