"""probe demo: the study pipeline at smoke scale, resumable and spread over runs, and every notebook headless."""

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from repdyn.study import claims
from repdyn.study.power import VERDICTS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    if not HAVE_FMNIST and os.environ.get("CI") != "true":
        pytest.skip("Fashion-MNIST not installed (make data)")
    from repdyn.commands.demo import run_study

    root = tmp_path_factory.mktemp("study")
    # jobs=2: the runs train in two one-thread processes, as `make demo` does
    report = run_study(root / "run", "smoke", figures=root / "figures", progress=False, log=lambda s: None, jobs=2)
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
    # the online weights of every run's final checkpoint are evaluated beside the EMA (the cross-check)
    ev = pd.read_csv(run / "tables" / "eval_metrics.csv")
    online = ev[ev.weights == "model"]
    assert sorted(online.run) == sorted(ev.run.unique()) and (online.step == 40).all()
    assert "| online weights |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| C")]
    assert len(rows) == len(claims.CLAIMS) == 9 and all(any(f"**{v}**" in r for v in VERDICTS) for r in rows)
    for name in ("layer_grid_baseline.png", "teacher_vs_student.png", "probe_vs_quality.png", "quality_vs_time.png",
                 "sra_minus_baseline.png", "cka_blocks_by_run.png", "pca_sra.png"):
        assert (figures / name).stat().st_size > 5000, name
    # resumable: a second call skips training, probing and evaluation and only rewrites figures
    from repdyn.commands.demo import run_study

    t0 = time.perf_counter()
    run_study(run, "smoke", figures=figures, progress=False, log=lambda s: None)
    assert time.perf_counter() - t0 < 60


def test_only_one_run_then_gather(smoke_study):
    """--only RUN runs that run's steps (here all done already) and writes no report; a bad name is an error."""
    from repdyn.commands.demo import SCALES, run_study

    run, figures, _ = smoke_study
    assert run_study(run, "smoke", figures=figures, progress=False, log=lambda s: None, only="sra") is None
    with pytest.raises(ValueError, match="not a run of scale smoke"):
        run_study(run, "smoke", figures=figures, progress=False, log=lambda s: None, only="sra-s7")
    names = [n for n, _, _ in SCALES["cpu-repro"].run_specs()]  # issue 21's plan: baseline vs SRA, 5 paired seeds
    assert set(names) == {f"{a}-s{s}" for a in ("baseline", "sra") for s in range(5)} and len(names) == 10
    names = [n for n, _, _ in SCALES["gpu"].run_specs()]  # 4 arms x 3 paired seeds, one command on one GPU
    assert set(names) == {f"{a}-s{s}" for a in ("baseline", "sra", "diverse", "repa") for s in range(3)}


@pytest.mark.parametrize("scale", ["cpu-repro", "gpu"])
def test_the_judged_scales_can_pass_the_maturity_gate_by_design(scale):
    """A scale meant to judge the generation claims must not fail the gate by its set-up: its EMA holds
    < 1% of the initialisation at the end and its sample count keeps the class accuracy's SE < 2 points."""
    from repdyn.commands.demo import SCALES
    from repdyn.study.gate import MAX_CLASS_ACC_SE, MAX_INIT_FRACTION, binomial_se

    cfg = SCALES[scale]
    assert cfg.ema_decay ** cfg.steps < MAX_INIT_FRACTION
    assert binomial_se(0.5, cfg.eval_n) < MAX_CLASS_ACC_SE


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
