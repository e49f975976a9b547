"""Figures that must not mislead (the numbers behind them are tested beside their analyses)."""

from __future__ import annotations

import pandas as pd


def test_constant_curves_are_drawn_flat():
    from repdyn.analysis.plots import MIN_Y_SPAN, plot_similarity_curves

    frame = pd.DataFrame({"step": [1, 2, 3], "cka_mean_offdiag": [0.5, 0.5 + 1e-7, 0.5 - 1e-7],
                          "cka_student_teacher": [0.1, 0.5, 0.9], "orthogonality": 0.2, "token_cosine": 0.3,
                          "dispersion": -0.01, "diversity": 0.1})
    fig = plot_similarity_curves(frame, "t", {}, "st")
    lo, hi = fig.axes[0].get_ylim()
    assert hi - lo >= MIN_Y_SPAN - 1e-12
    lo, hi = fig.axes[1].get_ylim()
    assert hi - lo > 0.5  # a real trend keeps its own scale
