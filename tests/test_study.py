"""The main job: the study pipeline at smoke scale, every notebook headless, and the verdict rules."""

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import claims
from analysis.tables import StudyTables

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    if not HAVE_FMNIST and os.environ.get("CI") != "true":
        pytest.skip("Fashion-MNIST not installed (make data)")
    from commands.demo import run_study

    root = tmp_path_factory.mktemp("study")
    report = run_study(root / "run", "smoke", figures=root / "figures", progress=False, log=lambda s: None)
    return root / "run", root / "figures", report


def test_study_writes_report_covering_every_claim(smoke_study):
    run, figures, report = smoke_study
    text = report.read_text()
    for c in claims.CLAIMS:
        assert f"## {c}:" in text
    umask = os.umask(0)
    os.umask(umask)
    for written in (report, run / "tables" / "eval_metrics.csv", run / "tables" / "layer_grid_baseline" / "layer_grid.csv"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written  # readable as the umask says
    rows = [ln for ln in text.splitlines() if ln.startswith("| C")]
    assert len(rows) == 7 and all(any(v in r for v in ("held", "did not hold", "inconclusive")) for r in rows)
    for name in ("layer_grid_baseline.png", "teacher_vs_student.png", "probe_vs_quality.png", "quality_vs_time.png",
                 "sra_minus_baseline.png", "cka_blocks_by_run.png", "pca_sra.png"):
        assert (figures / name).stat().st_size > 5000, name
    # resumable: a second call skips training, probing and evaluation and only rewrites figures
    from commands.demo import run_study

    t0 = time.perf_counter()
    run_study(run, "smoke", figures=figures, progress=False, log=lambda s: None)
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_regenerates_its_figures(smoke_study, notebook, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    run, _, _ = smoke_study
    figs = tmp_path / "figs"
    os.environ["REPDYN_RUN"], os.environ["REPDYN_FIGURES"] = str(run), str(figs)
    try:
        nb = nbformat.read(notebook, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        os.environ.pop("REPDYN_RUN"), os.environ.pop("REPDYN_FIGURES")
    made = list(figs.glob("*.png"))
    assert made, f"{notebook.name} wrote no figure"
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


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


def test_c2_and_c3_rules():
    noisy_worse = _tb(layer_grid=_grid({1: 0.8, 2: 0.8}, slope=0.1))
    assert claims.check_c2(noisy_worse).verdict == "held"
    assert claims.check_c2(_tb(layer_grid=_grid({1: 0.5, 2: 0.5}, slope=-0.1))).verdict == "did not hold"
    base = _grid({1: 0.5, 2: 0.6, 3: 0.7})
    better = _grid({1: 0.6, 2: 0.7, 3: 0.8}, run="sra")
    worse = _grid({1: 0.4, 2: 0.5, 3: 0.6}, run="sra")
    assert claims.check_c3(_tb(layer_grid=pd.concat([base, better]))).verdict == "held"
    assert claims.check_c3(_tb(layer_grid=pd.concat([base, worse]))).verdict == "did not hold"


def test_c4_c5_c7_rules():
    steps = [100, 200, 300, 400]
    cur = pd.DataFrame([{"run": "sra", "step": s, "role": r, "accuracy": a}
                        for s, st, te in zip(steps, [0.5, 0.55, 0.6, 0.65], [0.6, 0.65, 0.7, 0.75])
                        for r, a in (("student", st), ("teacher", te))])
    assert claims.check_c4(_tb(curves=cur)).verdict == "held"
    swapped = cur.assign(role=cur["role"].map({"student": "teacher", "teacher": "student"}))
    assert claims.check_c4(_tb(curves=swapped)).verdict == "did not hold"
    rng = np.random.default_rng(0)
    acc = np.linspace(0.5, 0.8, 10)
    q = pd.DataFrame({"run": ["baseline"] * 5 + ["sra"] * 5, "step": steps + [500] + steps + [500],
                      "accuracy": acc, "fd_x": 100 - 100 * acc + rng.normal(0, 0.5, 10), "metric": "fd_x",
                      "train_seconds": [10, 20, 30, 40, 50, 12, 24, 36, 48, 60]})
    assert claims.check_c5(_tb(q)).verdict == "held"
    assert claims.check_c5(_tb(q.assign(fd_x=q["fd_x"].sample(frac=1, random_state=3).values))).verdict != "held"
    # SRA's fd drops faster: it reaches the baseline's final fd well before 50 s
    fast = q.copy()
    fast.loc[fast["run"] == "sra", "fd_x"] = [40, 30, 20, 15, 10]
    fast.loc[fast["run"] == "baseline", "fd_x"] = [60, 50, 45, 40, 35]
    assert claims.check_c7(_tb(fast)).verdict == "held"
    slow = fast.copy()
    slow.loc[slow["run"] == "sra", "fd_x"] = [80, 70, 60, 50, 45]
    assert claims.check_c7(_tb(slow)).verdict == "did not hold"


def test_c6_rule_uses_fd_noise():
    sims = pd.DataFrame({"run": ["baseline", "diverse"], "step": [100, 100], "cka_mean_offdiag": [0.9, 0.8]})
    q = pd.DataFrame({"run": ["baseline", "diverse"], "step": [100, 100], "accuracy": [0.5, 0.5],
                      "fd_x": [10.0, 9.0], "fd_x_se": [0.1, 0.1], "metric": "fd_x", "train_seconds": [1.0, 1.0]})
    assert claims.check_c6(_tb(q, curves_similarity=sims)).verdict == "held"
    noisy = q.assign(fd_x_se=[1.0, 1.0])  # a 1.0 gap is within 2 SE of the difference (2.8)
    assert claims.check_c6(_tb(noisy, curves_similarity=sims)).verdict == "inconclusive"
    same_sim = sims.assign(cka_mean_offdiag=[0.8, 0.9])
    assert claims.check_c6(_tb(noisy, curves_similarity=same_sim)).verdict == "did not hold"
