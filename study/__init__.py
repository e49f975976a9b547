"""The study that tests the papers' representation claims (``probe demo``), above the reusable analysis.

* :mod:`repdyn.study.scales` (``StudyConfig``, the named scales) and :mod:`repdyn.study.paths`;
* :mod:`repdyn.study.plan` (the resumable steps) and :mod:`repdyn.study.engine` (running them, in
  one-thread processes for ``--jobs``);
* :mod:`repdyn.study.tables` (every table, read once), :mod:`repdyn.study.power` (intervals over training
  seeds), :mod:`repdyn.study.claims` (the C1-C9 rules), :mod:`repdyn.study.arms` (every arm's numbers);
* :mod:`repdyn.study.figures` (one recipe per figure family) and :mod:`repdyn.study.report` (REPORT.md).
"""
