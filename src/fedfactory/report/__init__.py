"""The run report: one self-contained report.html built from whatever a run directory holds.

Figures are PNG data URIs and the page declares a Content-Security-Policy that forbids every network load, so
the file opens from disk anywhere and shows exactly what was written. A missing or unreadable piece (an
interrupted run, a refused module) becomes a visible note, never a traceback. Optional pieces written by other
commands are rendered when present:

- comparison.json: {"methods": [{"method", "rounds", "accuracy", "balanced_accuracy", "macro_f1", "auroc",
  "bytes_up", "bytes_down", "bytes_total", "wall_s"}, ...]}
- unlearning.json: any JSON object (shown field by field); per-class accuracy before and after is drawn as bars
  when given as {"before": {"per_class_accuracy": {...}}, "after": {...}} or as "per_class_accuracy_before" and
  "per_class_accuracy_after".

Reading the run's files (files.py), HTML pieces (markup.py), figures (figures.py), the sections (sections.py for
the run, trust.py for the sites and their data, cards.py for the modules) and the page that puts them together
(page.py).
"""

from fedfactory.report.figures import write_samples_png
from fedfactory.report.files import REPORT_NAME, ReportError
from fedfactory.report.page import render_report, write_report

__all__ = ["REPORT_NAME", "ReportError", "render_report", "write_report", "write_samples_png"]
