"""One module per paper study, the orchestrator (``run.py``) and the combined report (``report.py``).

Adding a study (``common.py`` holds everything shared):

1. ``reproduce/<name>.py``: a frozen ``Size`` dataclass (one docstring line per field), ``TINY``,
   ``QUICK`` and ``FULL`` sizes and ``MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s=...)``.
2. ``run(out_dir, *, full=False, tiny=False, device="cpu", seed=0)``: ``StudyRun.start(...)``, then
   small data, train, evaluate and claims steps that take the ``StudyRun``; the report through
   ``Markdown`` (its claims table is ``claims_table``), plots through ``figure``; last
   ``StudyRun.finish(claims, metrics)``, which writes and validates ``results.json``.
3. A ``Study`` row in ``run.STUDIES`` (name, module, paper, quick budget in minutes).
4. ``tests/reproduce/test_<name>_study.py``: the tiny mode end to end (seconds), checking the claim ids
   and the metrics the claims are computed from.

Dependencies go one way: studies and ``report.py`` import ``common.py``; ``run.py`` imports
``report.py``; nothing here imports ``run.py``.
"""
