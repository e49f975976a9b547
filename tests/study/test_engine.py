"""The study's record of compute: --only run sessions are counted when the study is gathered."""

import json

from repdyn.study.engine import RUN_TIMINGS, record_run, record_study
from repdyn.study.paths import StudyPaths
from repdyn.study.report import _sessions
from repdyn.study.scales import SCALES


def test_only_sessions_are_counted_in_the_gathered_study(tmp_path):
    paths = StudyPaths.of(tmp_path / "study")
    paths.make()
    cfg = SCALES["smoke"]
    for run in ("baseline", "sra"):
        paths.run_dir(run).mkdir(parents=True, exist_ok=True)
        record_run(paths, run, {"train": 100.0, "eval": 10.0})
    record_run(paths, "sra", {"train": 50.0})  # the run resumed in a second session: added, not replaced
    assert json.loads((paths.run_dir("sra") / RUN_TIMINGS).read_text())["timings_s"]["train"] == 150.0
    record_study(paths, cfg, {"curves": 5.0, "total": 5.0})
    study = json.loads(paths.study.read_text())
    assert study["timings_s"]["train"] == 250.0 and study["timings_s"]["eval"] == 20.0
    assert study["gather_timings_s"] == {"curves": 5.0, "total": 5.0} and study["run_sessions"] == 3
    assert _sessions(study) == "1 gathering session(s) and 3 `--only` run session(s)"
    record_study(paths, cfg, {"curves": 1.0})  # a second gather adds its own time, runs are not counted twice
    study = json.loads(paths.study.read_text())
    assert study["timings_s"]["train"] == 250.0 and study["gather_timings_s"]["curves"] == 6.0
    assert study["gather_sessions"] == 2


def test_a_study_that_trained_in_one_session_says_so(tmp_path):
    paths = StudyPaths.of(tmp_path / "study")
    paths.make()
    record_study(paths, SCALES["smoke"], {"train": 9.0, "total": 9.0})
    assert _sessions(json.loads(paths.study.read_text())) == "1 session(s)"
    old_only = {"gather_sessions": 1, "run_sessions": 0, "gather_timings_s": {"curves": 1.0}}
    assert "recorded no compute" in _sessions(old_only)
