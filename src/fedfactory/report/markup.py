"""HTML pieces for the report: escaping, number formatting, notes, tables and images."""

import html
import math

# The metrics a results table shows, in this order.
HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object, digits: int = 4) -> str:
    """Numbers for tables: fixed decimals for floats, thousands separators for ints, n/a for None."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; `rows` hold already-escaped cell HTML."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'
