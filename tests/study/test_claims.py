"""The study's verdict rules (repdyn.study.claims, power, arms, tables) on planted effects."""

import numpy as np
import pandas as pd
import pytest

from repdyn.study import claims
from repdyn.study.tables import StudyTables


def _tb(quality: pd.DataFrame | None = None, **tables) -> StudyTables:
    """Study tables with the given frames (and a given quality table instead of the derived one)."""
    tb = StudyTables(**tables)
    if quality is not None:
        tb.quality = quality
    return tb


def _grid(profile_by_block: dict[int, float], ts=(0.1, 0.5, 0.9), run="baseline", slope=0.0, n_test=1000):
    rows = []
    for b, acc in profile_by_block.items():
        for i, t in enumerate(ts):
            rows.append({"run": run, "block": b, "t": t, "log_snr": float(np.log((1 - t) ** 2 / t**2)),
                         "accuracy": acc - slope * i, "n_test": n_test})
    return pd.DataFrame(rows)


def test_c1_rule_needs_a_real_mid_depth_peak():
    peaked = _tb(layer_grid=_grid({1: 0.5, 2: 0.7, 3: 0.8, 4: 0.7, 5: 0.6}))
    rising = _tb(layer_grid=_grid({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.75, 5: 0.8}))
    flat = _tb(layer_grid=_grid({1: 0.70, 2: 0.71, 3: 0.71, 4: 0.70, 5: 0.70}))
    assert claims.check_c1(peaked).verdict == "held"
    assert claims.check_c1(rising).verdict == "did not hold"
    assert claims.check_c1(flat).verdict == "inconclusive"


@pytest.mark.parametrize("shape,sd,want", [
    ({1: 0.5, 2: 0.7, 3: 0.8, 4: 0.7, 5: 0.6}, 0.005, "held"),  # a mid-depth peak well above seed noise
    ({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.75, 5: 0.8}, 0.005, "did not hold"),  # rises to the last block
    ({1: 0.8, 2: 0.75, 3: 0.7, 4: 0.6, 5: 0.5}, 0.005, "did not hold"),  # falls from block 1
    ({1: 0.70, 2: 0.71, 3: 0.72, 4: 0.71, 5: 0.70}, 0.03, "underpowered at this scale"),  # peak << seed noise
])
def test_c1_rule_over_training_seeds(shape, sd, want):
    """With several baseline seeds, C1's noise is the seed spread of each block's accuracy."""
    rng = np.random.default_rng(3)
    grids = [_grid({b: a + rng.normal(0, sd) for b, a in shape.items()}, run=f"baseline-s{s}") for s in range(4)]
    v = claims.check_c1(_tb(layer_grid=pd.concat(grids, ignore_index=True)))
    assert v.verdict == want, (v.summary, v.details)


def test_c5_reads_the_baseline_at_the_teachers_t():
    grid = _grid({1: 0.5, 2: 0.6}, ts=(0.1, 0.5), slope=0.2)  # 0.5 / 0.3 at block 1, t 0.1 / 0.5
    acc, how = claims._accuracy_at_t(grid, 0.3)
    assert acc[1] == pytest.approx(40.0) and acc[2] == pytest.approx(50.0) and "0.3" in how
    acc, how = claims._accuracy_at_t(grid, None)
    assert acc[1] == pytest.approx(40.0) and "mean" in how


def test_c2_rule():
    noisy_worse = _tb(layer_grid=_grid({1: 0.8, 2: 0.8}, slope=0.1))
    assert claims.check_c2(noisy_worse).verdict == "held"
    assert claims.check_c2(_tb(layer_grid=_grid({1: 0.5, 2: 0.5}, slope=-0.1))).verdict == "did not hold"
    mixed = pd.concat([_grid({1: 0.8, 2: 0.8}, slope=0.1, run="baseline-s0"),
                       _grid({1: 0.5, 2: 0.5}, slope=-0.1, run="baseline-s1")], ignore_index=True)
    assert claims.check_c2(_tb(layer_grid=mixed)).verdict == "inconclusive"  # must hold in every seed


# ------------------------------------------------------------------------------------------------
# Planted effects: the truth is known, the rules must find it (held / did not hold / underpowered)
# ------------------------------------------------------------------------------------------------


SEEDS = (0, 1, 2, 3)


CASES = {  # name -> (effect in the claim's units, seed-to-seed sd, verdict)
    "large effect, small seed noise": (1.0, 0.05, "held"),
    "reversed effect": (-1.0, 0.05, "did not hold"),
    "small effect, large seed noise": (0.2, 2.0, "underpowered at this scale"),
}


def _seeded(arm: str, s: int) -> str:
    return f"{arm}-s{s}"


def _planted(claim: str, effect: float, sd: float, seeds=SEEDS) -> StudyTables:
    """Synthetic study tables whose arm difference for ``claim`` is ``effect`` (x the claim's
    threshold) with seed noise ``sd`` (x the threshold)."""
    rng = np.random.default_rng(7)
    thr = claims.EFFECTS[claim]
    grid, curves, sims, q = [], [], [], []
    for s in seeds:
        noise = lambda: rng.normal(0, sd * thr)  # noqa: E731
        if claim == "C3":
            for arm, shift in (("baseline", 0.0), ("sra", effect * thr + noise())):
                grid.append(_grid({1: 0.5 + shift / 100, 2: 0.6 + shift / 100}, run=_seeded(arm, s)))
        if claim == "C4":
            gap = effect * thr + noise()
            for step, base in ((100, 0.5), (200, 0.55), (300, 0.6)):
                curves += [{"run": _seeded("sra", s), "step": step, "role": "student", "accuracy": base},
                           {"run": _seeded("sra", s), "step": step, "role": "teacher", "accuracy": base + gap / 100}]
        if claim == "C6":
            red = effect * thr + noise()
            for arm, fd, cka in (("baseline", 10.0, 0.9), ("diverse", 10.0 * (1 - red), 0.8)):
                q.append({"run": _seeded(arm, s), "step": 300, "fd_x": fd, "accuracy": 0.5, "metric": "fd_x",
                          "train_seconds": 1.0})
                sims.append({"run": _seeded(arm, s), "step": 300, "cka_mean_offdiag": cka})
        if claim == "C7":
            saving = effect * thr + noise()  # SRA needs (1 - saving) of the baseline's steps
            for step in (100, 200, 300, 400):
                q.append({"run": _seeded("baseline", s), "step": step, "fd_x": 100 - 0.2 * step, "accuracy": 0.5,
                          "metric": "fd_x", "train_seconds": step})
                q.append({"run": _seeded("sra", s), "step": step, "fd_x": 100 - 0.2 * step / (1 - saving),
                          "accuracy": 0.5, "metric": "fd_x", "train_seconds": step})
    if claim == "C5":  # baseline accuracy rises with k; fd of SRA aligned to k falls (effect > 0) or rises
        ks = (2, 3, 4, 5, 6)
        grid.append(_grid({k: 0.4 + 0.05 * k for k in ks}, run="baseline"))
        for s in seeds:
            for k in ks:
                q.append({"run": _seeded(f"sra-kt{k}", s), "step": 300, "accuracy": 0.5, "metric": "fd_x",
                          "fd_x": 50 - effect * 2 * k + rng.normal(0, sd * 20), "train_seconds": 1.0})
    tb = StudyTables(study={"step_cost": {"baseline": 1.0, "sra": 1.0}, "cells": {"teacher_block": 4}},
                     layer_grid=pd.concat(grid, ignore_index=True) if grid else None,
                     curves=pd.DataFrame(curves) if curves else None,
                     curves_similarity=pd.DataFrame(sims) if sims else None)
    tb.quality = pd.DataFrame(q) if q else pd.DataFrame(columns=["run", "step", "metric", "accuracy"])
    return tb


@pytest.mark.parametrize("claim", ["C3", "C4", "C5", "C6", "C7"])
@pytest.mark.parametrize("case", list(CASES))
def test_rules_find_planted_effects(claim, case):
    effect, sd, want = CASES[case]
    v = claims.RULES[claim](_planted(claim, effect, sd))
    assert v.verdict == want, (claim, case, v.summary, v.details)


@pytest.mark.parametrize("claim", ["C3", "C4", "C6", "C7"])
def test_one_seed_per_arm_is_underpowered_not_a_verdict(claim):
    """One training seed: the run-to-run spread is unmeasured, whatever the difference looks like."""
    v = claims.RULES[claim](_planted(claim, 1.0, 0.05, seeds=(0,)))
    assert v.verdict == "underpowered at this scale" and "one training seed" in v.summary, v.summary


def test_power_compare_and_judge():
    from repdyn.study.power import compare, judge

    c = compare([1.0, 1.2, 0.9, 1.1], [0.0, 0.1, -0.1, 0.05])
    assert c.ci_low > 0 and judge(c, 0.5) == "held" and 0 < c.mde < 1
    assert judge(compare([0.1, -0.1, 0.05, -0.02], [0.0, 0.01, 0.0, -0.01]), 1.0) == "did not hold"
    assert judge(compare([2.0, -1.5, 1.0], [0.0, 0.1, 0.0]), 1.0) == "underpowered at this scale"


def test_arm_table_and_teacher_ema_sensitivity():
    """Every arm's final numbers over seeds, and the App. F lines: one per SRA teacher decay."""
    from repdyn.study.arms import arm_table, ema_sensitivity
    from repdyn.study.report import render_report

    q, curves = [], []
    for arm, fd, gap in (("baseline", 10.0, 0.0), ("sra", 9.0, 2.0), ("sra-ema0.99", 9.5, 0.5),
                         ("baseline-ema0.9995", 20.0, 0.0), ("sra-ema0.9995", 19.0, 0.5)):
        for s in (0, 1, 2):
            run = _seeded(arm, s)
            for step in (100, 200):
                q.append({"run": run, "step": step, "fd_x": fd + 0.1 * s + (200 - step) / 100, "accuracy": 0.5,
                          "metric": "fd_x", "train_seconds": step})
                curves += [{"run": run, "step": step, "role": "student", "accuracy": 0.5},
                           {"run": run, "step": step, "role": "teacher", "accuracy": 0.5 + gap / 100}]
    tb = StudyTables(study={"config": {"ema_decay": 0.999}, "cells": {}}, curves=pd.DataFrame(curves))
    tb.quality = pd.DataFrame(q)
    arms = arm_table(tb).set_index("arm")
    assert arms.loc["sra", "seeds"] == 3 and arms.loc["sra", "metric_value_mean"] == pytest.approx(9.1)
    assert arms.loc["sra", "teacher_acc_mean"] - arms.loc["sra", "student_acc_mean"] == pytest.approx(2.0)
    lines = ema_sensitivity(tb)
    assert len(lines) == 3 and lines[0].startswith("decay 0.99 ") and lines[1].startswith("decay 0.999 ")
    assert "-9.9%" in lines[1]  # (9.1 - 10.1) / 10.1
    assert "vs `baseline-ema0.9995` 20.10" in lines[2]  # each decay against the baseline at that decay
    assert "no baseline at EMA 0.99" in lines[0]  # the decay is also the sampled EMA's: not comparable
    text = render_report(tb, [], set(), "test machine", "tables")
    assert "## Every arm at its final checkpoint" in text and "teacher EMA" in text


def test_depth_profiles_over_seeds_and_steps():
    from repdyn.study.tables import depth_profiles

    grids = pd.concat([_grid({0: 0.2, 1: 0.5 + 0.01 * s, 2: 0.6}, run=f"baseline-s{s}").assign(step=step)
                       for s in (0, 1, 2) for step in (500, 1000)], ignore_index=True)
    prof = depth_profiles(grids).set_index(["step", "block"])
    assert prof.loc[(500, 1), "mean"] == pytest.approx(51.0) and prof.loc[(500, 1), "std"] == pytest.approx(1.0)
    assert prof.loc[(1000, 0), "seeds"] == 3 and prof.loc[(1000, 2), "std"] == pytest.approx(0.0)
