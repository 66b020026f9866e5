"""The evaluation report: figures (:mod:`.figures`) and self-contained HTML pages (:mod:`.html`).

Entry point: :func:`dkiharm_nipype.report.html.build_report`.
"""
