"""The report page: every section in order, inside one self-contained HTML document, written atomically."""

from pathlib import Path

import torch

from fedfactory import __version__
from fedfactory.report.cards import section_modules
from fedfactory.report.files import REPORT_NAME, RUN_PIECES, ReportError, read_run
from fedfactory.report.markup import esc, note
from fedfactory.report.sections import (
    section_comparison,
    section_config,
    section_costs,
    section_header,
    section_partition,
    section_results,
    section_unlearning,
)
from fedfactory.report.trust import section_privacy, section_release, section_sites
from fedfactory.runs import atomic_write_text

# Errors a malformed (not missing) input file can raise while a section reads it; the section becomes a note.
BAD_INPUT = (ValueError, KeyError, TypeError, IndexError)


def guarded(title: str, render, *args) -> str:
    """Render one section; a malformed input file gives a visible note in its place instead of a traceback."""
    try:
        return render(*args)
    except BAD_INPUT as e:
        return f"<section><h2>{esc(title)}</h2>" + note(f"This section could not be drawn from the run's files: "
                                                         f"{type(e).__name__}: {e}") + "</section>"


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d232b; margin: 0 auto; max-width: 1260px; padding: 16px 24px 40px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 17px; border-bottom: 1px solid #d6dbe1; padding-bottom: 3px;
       margin: 26px 0 10px; } h3 { font-size: 13px; margin: 0 0 2px; font-family: ui-monospace, monospace; }
.facts span { margin-right: 2px; white-space: nowrap; color: #4a5563; } .facts b { color: #1d232b; }
.lead { font-size: 16px; } .small { font-size: 12px; color: #4a5563; margin: 2px 0 6px; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 5px 10px; margin: 8px 0; }
.missing { background: #fdecea; border-left: 4px solid #c62828; padding: 6px 12px; margin: 10px 0; }
.missing ul { margin: 4px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d6dbe1; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f1f4f7; } table.num td + td { text-align: right; font-variant-numeric: tabular-nums; }
table.kv code { white-space: pre-wrap; word-break: break-all; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
img.grid { image-rendering: pixelated; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; align-items: stretch; }
.card { border: 1px solid #d6dbe1; border-radius: 4px; padding: 8px; overflow-wrap: anywhere; width: min-content;
        min-width: 200px; }
.card.refused { background: #fdecea; }
.pair { display: flex; gap: 8px; } figure { margin: 0; } figcaption { font-size: 11px; color: #4a5563; }
pre { background: #f6f8fa; padding: 8px 12px; font-size: 12px; columns: 18em; column-gap: 2em; }
footer { margin-top: 30px; font-size: 11px; color: #6b7480; }
@media print { body { max-width: none; padding: 0; font-size: 12px; }
  section, .card, figure, img, table { break-inside: avoid; } h2 { break-after: avoid; } }
@page { size: A4; margin: 12mm; }
"""
# Self-containment is enforced, not just hoped for: the browser refuses any load that is not an inline image or style.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_report(run_dir: Path, show_real: bool = False, device: torch.device | None = None,
                  samples_per_module: int = 16, max_module_cards: int = 60) -> str:
    """The report of a run directory as one HTML string; modules are sampled on `device` (default CPU)."""
    device = device or torch.device("cpu")
    run = read_run(run_dir)
    sections = [
        section_header(run),
        guarded("Results", section_results, run),
        guarded("Modules", section_modules, run, show_real, samples_per_module, device, max_module_cards),
        guarded("Partition", section_partition, run),
        guarded("Sites: trust and influence", section_sites, run),
        guarded("Release check", section_release, run),
        guarded("Comparison", section_comparison, run),
        guarded("Unlearning certificate", section_unlearning, run),
        guarded("Privacy", section_privacy, run),
        guarded("Costs", section_costs, run),
        section_config(run),
    ]
    title = f"FederatedFactory report: {run_dir.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<footer>Written by fedfactory {esc(__version__)} from {esc(run_dir.resolve())}.</footer>"
            "</body></html>\n")


def write_report(run_dir: str | Path, show_real: bool = False, device: torch.device | None = None,
                 samples_per_module: int = 16) -> Path:
    """Write <run_dir>/report.html atomically from what the run directory holds; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    if not any((run_dir / name).exists() for name in RUN_PIECES):
        raise ReportError(f"{run_dir} is not a run directory: it has none of {', '.join(RUN_PIECES)}")
    if samples_per_module < 1:
        raise ReportError(f"samples_per_module={samples_per_module}: must be >= 1")
    text = render_report(run_dir, show_real, device, samples_per_module)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, text)
    return path
