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
"""

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.image import imsave

from fedfactory import __version__
from fedfactory.config import Config, load_config
from fedfactory.data.datasets import load_data
from fedfactory.errors import FedFactoryError
from fedfactory.generative.train import sample_module
from fedfactory.modules.ids import implied_modules, module_id
from fedfactory.modules.refusal import ModuleError
from fedfactory.registry import load_registry_file
from fedfactory.runs import atomic_write_bytes, atomic_write_text

REPORT_NAME = "report.html"
RUN_PIECES = ("config.toml", "partition.json", "metrics.json", "modules")
HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
# Errors a malformed (not missing) input file can raise while a section reads it; the section becomes a note.
BAD_INPUT = (ValueError, KeyError, TypeError, IndexError)


class ReportError(FedFactoryError, ValueError):
    """The path is not a run directory."""


@dataclass
class RunFiles:
    """The pieces of a run directory, each None when absent or unreadable (with a note saying which)."""

    path: Path
    config_text: str | None = None
    config: Config | None = None
    partition: dict | None = None
    metrics: dict | None = None
    comparison: dict | None = None
    unlearning: dict | None = None
    audit: dict | None = None
    module_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# Reading the run directory.


def read_json(path: Path, notes: list[str], required: bool) -> dict | None:
    """A JSON object from `path`, or None with a note when it is missing (if required) or malformed."""
    if not path.is_file():
        if required:
            notes.append(f"{path.name} is missing")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name} is unreadable ({e})")
        return None
    if not isinstance(value, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return None
    return value


def read_run(run_dir: Path) -> RunFiles:
    """Read every piece a report can use; nothing here raises for a missing or malformed piece."""
    run = RunFiles(run_dir)
    config_path = run_dir / "config.toml"
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:
            run.config = load_config(str(config_path))
        except ValueError as e:
            run.notes.append(f"config.toml does not load ({e}); samples use seed 0")
    else:
        run.notes.append("config.toml is missing; samples use seed 0")
    run.partition = read_json(run_dir / "partition.json", run.notes, required=True)
    run.metrics = read_json(run_dir / "metrics.json", run.notes, required=True)
    if run.metrics is None and (run_dir / "partition.json").is_file():
        run.notes.append("no results yet: the run stopped before evaluation (resume it with the same command)")
    run.comparison = read_json(run_dir / "comparison.json", run.notes, required=False)
    run.unlearning = read_json(run_dir / "unlearning.json", run.notes, required=False)
    run.audit = read_json(run_dir / "audit.json", run.notes, required=False)
    run.module_paths = sorted((run_dir / "modules").glob("*.safetensors"))
    if not run.module_paths:
        run.notes.append("no modules in modules/")
    return run


def expected_modules(partition: dict, min_samples: int = 1) -> list[str]:
    """Module ids the partition implies: one per (client, class) cell with at least min_samples real images."""
    # A deployment's partition.json names its sites (module ids carry the site name); a simulation's numbers them.
    clients = partition.get("sites") or list(range(len(partition["histogram"])))
    return list(implied_modules(partition["histogram"], clients, min_samples))


# HTML and figure helpers.


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


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig: Figure) -> str:
    """Render a matplotlib figure (no pyplot, so no global figure state) to a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return png_uri(buf.getvalue())


def img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def image_grid(images: np.ndarray, cols: int = 4, width: int = 140) -> np.ndarray:
    """uint8 (n, H, W, C) images tiled into one RGB uint8 picture about `width` pixels wide (whole-pixel upscaling)."""
    n, h, w, c = images.shape
    scale = max(1, round(width / (cols * w)))
    pad = 1
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        im = np.repeat(np.repeat(im, scale, 0), scale, 1)  # nearest neighbour keeps tiny images honest
        r, q = divmod(i, cols)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = im if c == 3 else np.repeat(im, 3, axis=2)
    return canvas


def grid_uri(images: np.ndarray) -> str:
    buf = io.BytesIO()
    imsave(buf, image_grid(images), format="png")
    return png_uri(buf.getvalue())


def heatmap(ax, values: np.ndarray, xlabels: list[str], ylabels: list[str], annotate: np.ndarray | None,
            cmap: str = "Blues") -> None:
    """Matrix as colored cells with optional integer annotations; text flips to white on dark cells."""
    vmax = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 1.0
    ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax or 1.0, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45 if max(map(len, xlabels), default=0) > 3 else 0,
                  ha="right" if max(map(len, xlabels), default=0) > 3 else "center", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if annotate is not None and values.size <= 400:
        for (i, j), v in np.ndenumerate(annotate):
            if v:
                dark = values[i, j] > 0.6 * (vmax or 1.0)
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color="white" if dark else "black")


def bars(per_series: dict[str, list[float | None]], labels: list[str], ylabel: str, title: str) -> str:
    """Grouped vertical bars, one group per label, one bar per series; None is drawn as a gap."""
    fig = Figure(figsize=(min(7.0, max(4.0, 0.22 * len(labels) * len(per_series) + 1.6)), 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(per_series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(per_series.items()):
        ys = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(per_series) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x, labels, rotation=45 if max(map(len, labels), default=0) > 3 else 0,
                  ha="right" if max(map(len, labels), default=0) > 3 else "center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(per_series) > 1:
        ax.legend(fontsize=8, loc="lower right")
    return img(figure_uri(fig), title)


# Sections. Each returns HTML; a malformed input file turns the section into a note (see `guarded`).


def section_header(run: RunFiles) -> str:
    cfg = run.config
    facts = [("run", run.path.name)]
    if cfg is not None:
        d = cfg.data
        sites = (run.partition or {}).get("sites") if (run.partition or {}).get("scheme") == "sites" else None
        split = (f"deployment, {len(sites)} sites: {', '.join(map(str, sites))}" if sites is not None
                 else f"{d.partition}, {d.num_clients} clients")
        facts += [("dataset", d.dataset), ("partition", split),
                  ("generator", cfg.generator.family), ("classifier", cfg.classifier.mode), ("seed", cfg.run.seed)]
    if run.metrics is not None:
        facts.append(("config hash", str(run.metrics.get("config_hash", ""))[:12]))
    head = " · ".join(f"<span>{esc(k)} <b>{esc(v)}</b></span>" for k, v in facts)
    missing = ""
    if run.notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in run.notes)
        missing = (f'<div class="missing"><b>Missing or unreadable pieces.</b> This report shows what exists.'
                   f"<ul>{items}</ul></div>")
    return f'<header><h1>FederatedFactory report</h1><p class="facts">{head}</p>{missing}</header>'


def section_results(run: RunFiles) -> str:
    m = run.metrics
    if m is None:
        return f"<section><h2>Results</h2>{note('No metrics.json: the classifier was not evaluated yet.')}</section>"
    mode = run.config.classifier.mode if run.config is not None else "server"
    rows = [(f"factory ({mode})", m)]
    ref = (m.get("reference") or {}).get("centralized")
    if ref:
        rows.append(("centralized (pooled real data)", ref))
    body = [[esc(name)] + [fmt(r.get(k)) for k in HEADLINE_KEYS] for name, r in rows]
    body[0][1] = f'<b id="headline-accuracy">{fmt(m["accuracy"])}</b>'
    out = [f'<section><h2>Results</h2><p class="lead">Test accuracy <b>{fmt(m["accuracy"])}</b>',
           f' on {fmt(m.get("num_test"))} real test images']
    if ref:
        out.append(f'; {fmt(m["reference"]["accuracy_ratio"], 3)} of the centralized reference')
    out.append(".</p>")
    out.append(table(["method"] + list(HEADLINE_KEYS), body, "num"))
    if m.get("missing_classes"):
        out.append(note(f"No module for classes {', '.join(map(str, m['missing_classes']))}: "
                        "the classifier never saw them."))

    names = list(m["per_class_accuracy"])
    series = {"factory": [m["per_class_accuracy"][n] for n in names]}
    if ref:
        series["centralized"] = [ref["per_class_accuracy"].get(n) for n in names]
    out.append('<div class="figs">')
    out.append(bars(series, names, "accuracy", "Per-class test accuracy"))

    cm = np.asarray(m["confusion_matrix"], dtype=np.int64)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"metrics.json: confusion_matrix is {cm.shape}, expected {len(names)} x {len(names)}")
    fig = Figure(figsize=(min(8.0, 0.28 * len(names) + 1.6), min(8.0, 0.26 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    rates = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    heatmap(ax, rates, names, names, cm)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (counts; color = row rate)", fontsize=10)
    out.append(img(figure_uri(fig), "Confusion matrix"))
    out.append("</div></section>")
    return "".join(out)


def section_partition(run: RunFiles) -> str:
    p = run.partition
    if p is None:
        return ""
    hist = np.asarray(p["histogram"], dtype=np.int64)
    names = [str(n) for n in p["class_names"]]
    if hist.ndim != 2 or hist.shape[1] != len(names) or (hist < 0).any():
        raise ValueError(f"partition.json: histogram is {hist.shape}, expected clients x {len(names)} counts >= 0")
    fig = Figure(figsize=(min(9.0, 0.3 * len(names) + 1.6), min(9.0, 0.24 * len(hist) + 1.1)), layout="constrained")
    ax = fig.subplots()
    heatmap(ax, hist.astype(float), names, [str(k) for k in p.get("sites") or range(len(hist))], hist, cmap="Greens")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title("Real training samples per client and class", fontsize=10)
    per_client = hist.sum(1)
    text = (f"Scheme <b>{esc(p.get('scheme', '?'))}</b>, {len(hist)} clients, {fmt(int(hist.sum()))} training "
            f"images; {fmt(int(per_client.min()))} to {fmt(int(per_client.max()))} per client, "
            f"{int((hist > 0).sum())} (client, class) cells held.")
    return (f'<section><h2>Partition</h2><p>{text}</p><div class="figs">'
            f'{img(figure_uri(fig), "Partition heatmap")}</div></section>')


def section_release(run: RunFiles) -> str:
    """The release check: which modules stayed at their sites because they replay their images, with the numbers,
    the cells too small for a module, and the classes left without one."""
    r = (run.metrics or {}).get("release")
    if not r:
        return ""
    out = ["<section><h2>Release check</h2>",
           f"<p>{fmt(r['checked'])} modules checked at their sites before release: a module is withheld when more than "
           f"{fmt(r['max_copy_fraction'], 3)} of its samples are near-copies of its training images. Cells under "
           f"generator.min_samples = {fmt(r['min_samples'])} images train no module.</p>"]
    if r["withheld"]:
        out.append(table(["withheld module", "images", "near-copy fraction", "median ratio", "reference"],
                         [[esc(mid), fmt(w["num_samples"]), fmt(w["copy_fraction"], 3), fmt(w["ratio_median"], 3),
                           esc(w["reference"])] for mid, w in sorted(r["withheld"].items())], "num"))
    else:
        out.append(note("No module was withheld."))
    if r["below_min_samples"]:
        cells = ", ".join(f"{esc(c['client'])}/{esc(c['class'])} ({fmt(c['images'])})" for c in r["below_min_samples"])
        out.append(f"<p>Cells below generator.min_samples (client/class, images): {cells}.</p>")
    if r["classes_without_module"]:
        out.append(note("Classes without any module (no synthetic images; the server's classifier never sees them): "
                        + ", ".join(r["classes_without_module"]) + "."))
    return "".join(out) + "</section>"


def section_sites(run: RunFiles) -> str:
    """Trust and influence: whether names and counts were pinned, each site's share of each class (real images and
    the synthetic images its modules made), and each site's own evaluation beside the pooled one."""
    m = run.metrics
    if m is None or not any(k in m for k in ("trust", "site_shares")):
        return ""
    out = ["<section><h2>Sites: trust and influence</h2>"]
    trust = m.get("trust") or {}
    if trust.get("pinned"):
        pinned = ", ".join(f"{esc(s)} (node {esc(n)})" for s, n in sorted((trust.get("sites") or {}).items()))
        out.append(f"<p>Pinned by <code>{esc(trust.get('pin_file'))}</code>: {pinned or 'no site'}. "
                   f"{esc(trust.get('note', ''))}.</p>")
    elif trust:
        out.append(note(f"Not pinned: {trust.get('note', 'names and counts were trusted as reported')}."))
    out.append(site_summary(m))
    rows = [[esc(site), esc(c), fmt(r["images"]), fmt(r["image_share"], 3), fmt(r["synthetic"]),
             fmt(r["synthetic_share"], 3)]
            for site, classes in sorted((m.get("site_shares") or {}).items()) for c, r in classes.items()]
    if rows:
        out.append("<p>Each site's share of each class: its real images over the class's, and the synthetic images "
                   "its modules contributed over the class's (a site's counts weight its modules in synthesis).</p>")
        out.append(table(["site", "class", "images", "share", "synthetic", "synthetic share"], rows, "num"))
    ev = m.get("evaluation") or {}
    if ev.get("per_site"):
        declared = ev.get("declared_test_images") or {}
        body = [[esc(site), fmt(declared.get(site)), fmt(r.get("num_test"))] + [fmt(r.get(k)) for k in HEADLINE_KEYS]
                for site, r in sorted(ev["per_site"].items())]
        body.append(["<b>pooled</b>", fmt(sum(declared.values()) if declared else None), fmt(m.get("num_test"))]
                    + [fmt(m.get(k)) for k in HEADLINE_KEYS])
        out.append("<p>Each site's own metrics, from the counts it returned, beside the pooled ones.</p>")
        out.append(table(["site", "declared test images", "scored"] + list(HEADLINE_KEYS), body, "num"))
    if ev.get("failed_sites"):
        out.append(note("Evaluation failed at " + "; ".join(f"{esc(s)}: {esc(r)}"
                                                            for s, r in sorted(ev["failed_sites"].items()))))
    out.append("</section>")
    return "".join(out)


def site_summary(m: dict) -> str:
    """One row per site: the real images it holds per class, the modules it sent and their bytes, and the test
    images it scored with its own accuracy (from the counts it returned)."""
    shares, sent = m.get("site_shares") or {}, m.get("bytes") or {}
    per_site = (m.get("evaluation") or {}).get("per_site") or {}
    rows = []
    for site, classes in sorted(shares.items()):
        held = ", ".join(f"{esc(c)} {fmt(r['images'])}" for c, r in classes.items() if r["images"])
        scored = per_site.get(site) or {}
        rows.append([esc(site), held or "none", fmt((sent.get("modules_per_client") or {}).get(site, 0)),
                     human_bytes((sent.get("per_client") or {}).get(site, 0)), fmt(scored.get("num_test")),
                     fmt(scored.get("accuracy"))])
    if not rows:
        return ""
    return ("<p>What each site holds, sent and scored: its real training images per class, the modules that left "
            "it (withheld ones stay home, see the release check) and their bytes, and the test images it scored with "
            "its own accuracy.</p>"
            + table(["site", "real images per class", "modules sent", "bytes sent", "test images scored", "accuracy"],
                    rows, "num"))


def real_images(run: RunFiles, per_module: int) -> tuple[dict[str, np.ndarray], str]:
    """Module id -> up to `per_module` real training images of that client and class, with a note on failure."""
    if run.config is None or run.partition is None:
        return {}, "Real images need config.toml and partition.json."
    if "indices" not in run.partition:
        return {}, "Real images are not shown: this is a deployment, whose server holds no training data."
    try:
        train, _ = load_data(run.config.data)
    except (ValueError, OSError) as e:
        return {}, f"Real images are not shown: the dataset did not load ({e})."
    out = {}
    for k, rows in enumerate(run.partition["indices"]):
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(train)):
            raise ValueError(f"partition.json: client {k} has indices outside the {len(train)}-image training set")
        for c in np.unique(train.labels[rows]):
            out[module_id(k, int(c))] = train.images[rows[train.labels[rows] == c][:per_module]]
    return out, ""


def module_card(path: Path, seed: int, per_module: int, device: torch.device, plan: dict,
                real: dict[str, np.ndarray] | None) -> str:
    """One module: its manifest facts, a grid of its first synthetic images and, if given, real ones."""
    size = path.stat().st_size
    try:
        manifest, tensors = load_registry_file(path)
    except ModuleError as e:
        return f'<div class="card refused"><h3>{esc(path.stem)}</h3>{note(f"refused: {e}")}</div>'
    # Sampling builds a network, which draws its init from the global generator; keep the caller's state.
    with torch.random.fork_rng(devices=[]):
        synthetic = sample_module(tensors, manifest, range(per_module), seed, device)
    t = manifest["training"]
    loss = f", final loss {t['final_loss']:.4f}" if isinstance(t.get("final_loss"), float) else ""
    used = plan.get(manifest["module_id"])
    used_text = f"; {fmt(used)} images in the synthetic set" if used is not None else ""
    facts = (f"client {manifest['client_id']} · class {esc(manifest['class_name'])}<br>"
             f"{fmt(manifest['num_samples'])} real images, {fmt(t['steps'])} steps{loss}<br>"
             f"{esc(manifest['family'])}, {human_bytes(size)}{used_text}")
    grids = f'<figure>{img(grid_uri(synthetic), "synthetic samples", "grid")}<figcaption>synthetic</figcaption>'
    grids += "</figure>"
    if real is not None:
        ims = real.get(manifest["module_id"])
        if ims is not None and len(ims):
            grids += f'<figure>{img(grid_uri(ims), "real samples", "grid")}<figcaption>real</figcaption></figure>'
        else:
            grids += '<figure><p class="note">no real images</p></figure>'
    return (f'<div class="card"><h3>{esc(manifest["module_id"])}</h3><p class="small">{facts}</p>'
            f'<div class="pair">{grids}</div></div>')


def section_modules(run: RunFiles, show_real: bool, per_module: int, device: torch.device, max_cards: int) -> str:
    out = ["<section><h2>Modules</h2>"]
    present = {p.stem for p in run.module_paths}
    if run.partition is not None:
        expected = expected_modules(run.partition, run.config.generator.min_samples if run.config is not None else 1)
        lacking = [m for m in expected if m not in present]
        out.append(f"<p>{len(present)} of {len(expected)} modules the partition implies are in modules/.</p>")
        if lacking:
            shown = ", ".join(lacking[:20]) + (f" and {len(lacking) - 20} more" if len(lacking) > 20 else "")
            out.append(note(f"Missing modules (not trained yet, or removed): {shown}."))
    if not run.module_paths:
        return "".join(out) + note("No module files yet.") + "</section>"
    seed = run.config.run.seed if run.config is not None else 0
    out.append(f"<p>Each grid shows images 0..{per_module - 1} of the module (root seed {seed}): the same images "
               "the synthetic training set starts with.</p>")
    real = None
    if show_real:
        real, why = real_images(run, per_module)
        out.append(note(why) if why else "<p>Next to them: real training images of the same client and class "
                   "(shown because --show-real was passed).</p>")
    else:
        out.append(note("Synthetic images only: the server never sees real data. Pass --show-real on a machine "
                        "that holds the dataset to compare with real training images."))
    plan = (run.metrics or {}).get("synthesis_plan") or {}
    cards = [module_card(p, seed, per_module, device, plan, real) for p in run.module_paths[:max_cards]]
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    if len(run.module_paths) > max_cards:
        out.append(note(f"Grids for the first {max_cards} of {len(run.module_paths)} modules."))
    return "".join(out) + "</section>"


def section_comparison(run: RunFiles) -> str:
    if run.comparison is None:
        return ""
    methods = run.comparison["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, dict) for m in methods):
        raise ValueError("comparison.json: 'methods' must be a list of objects")
    keys = ["rounds", "accuracy", "balanced_accuracy", "macro_f1", "auroc"]
    best = max((m.get("accuracy") or 0 for m in methods), default=None)
    rows = []
    for m in methods:
        name = esc(m.get("method", "?"))
        rows.append([f"<b>{name}</b>" if m.get("accuracy") == best else name] + [fmt(m.get(k)) for k in keys]
                    + [human_bytes(m[k]) if isinstance(m.get(k), int | float) else "n/a"
                       for k in ("bytes_up", "bytes_down", "bytes_total")]
                    + [fmt(m.get("wall_s"), 1)])
    out = ["<section><h2>Comparison</h2>",
           table(["method"] + keys + ["bytes up", "bytes down", "bytes total", "wall s"], rows, "num")]
    pts = [(m["bytes_total"], m["accuracy"], str(m.get("method", "?"))) for m in methods
           if isinstance(m.get("bytes_total"), int | float) and isinstance(m.get("accuracy"), int | float)]
    # Bytes span orders of magnitude, so the axis is logarithmic; methods that send nothing are listed instead.
    silent = [name for b, _, name in pts if b <= 0]
    pts = [p for p in pts if p[0] > 0]
    if pts:
        fig = Figure(figsize=(5.2, 3.2), layout="constrained")
        ax = fig.subplots()
        for b, a, name in pts:
            ax.scatter(b, a, s=30)
            ax.annotate(name, (b, a), textcoords="offset points", xytext=(5, -3), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("bytes communicated in total (log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title("Accuracy vs communication", fontsize=10)
        out.append(f'<div class="figs">{img(figure_uri(fig), "Accuracy vs bytes")}</div>')
    if silent:
        out.append(f"<p class=\"small\">Not plotted (no bytes communicated): {esc(', '.join(silent))}.</p>")
    return "".join(out) + "</section>"


def before_after(u: dict) -> tuple[dict, dict] | None:
    """Per-class accuracy before and after unlearning, in either accepted layout, or None."""
    if isinstance(u.get("before"), dict) and isinstance(u.get("after"), dict):
        b, a = u["before"].get("per_class_accuracy"), u["after"].get("per_class_accuracy")
    else:
        b, a = u.get("per_class_accuracy_before"), u.get("per_class_accuracy_after")
    return (b, a) if isinstance(b, dict) and isinstance(a, dict) else None


def section_unlearning(run: RunFiles) -> str:
    u = run.unlearning
    if u is None:
        return ""
    rows = []
    for key, value in u.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        rows.append([f"<code>{esc(key)}</code>", f"<code>{esc(text)}</code>"])
    out = ["<section><h2>Unlearning certificate</h2>", table(["field", "value"], rows, "kv")]
    pair = before_after(u)
    if pair:
        names = list(pair[0])
        out.append('<div class="figs">' + bars({"before": [pair[0].get(n) for n in names],
                                                "after": [pair[1].get(n) for n in names]},
                                               names, "accuracy", "Per-class accuracy before and after") + "</div>")
    return "".join(out) + "</section>"


def guarantee_text(privacy: dict | None) -> str:
    return "none" if not privacy else f"({fmt(privacy['epsilon'], 3)}, {fmt(privacy['delta'], 2)})-DP"


def section_privacy(run: RunFiles) -> str:
    """Each module's DP guarantee (metrics.json) and the audit's measurements (audit.json, if audited)."""
    guarantees = (run.metrics or {}).get("privacy")
    if run.audit is None and not guarantees:
        return ""
    out = ["<section><h2>Privacy</h2>"]
    if guarantees:
        private = [g for g in guarantees.values() if g]
        if private:
            weakest = max(private, key=lambda g: g["epsilon"])
            out.append(f"<p>{len(private)} of {len(guarantees)} modules are differentially private for their "
                       f"site's images, the weakest at <b>{guarantee_text(weakest)}</b>, adjacency "
                       f"{esc(weakest.get('adjacency', '?'))} ({esc(weakest['accountant'])}).</p>")
            out.append(table(["mechanism", "kind", "sensitivity", "noise std", "steps", "sampling rate"],
                             [[esc(m["name"]), esc(m["kind"]), fmt(m["sensitivity"], 4), fmt(m["noise_std"], 4),
                               str(m["steps"]), fmt(m["sampling_rate"], 4)] for m in weakest["mechanisms"]], "num"))
            out.append("<p>" + "; ".join(esc(n) for n in weakest.get("notes", [])) + ".</p>")
        else:
            out.append(note("No module carries a differential-privacy guarantee (privacy.epsilon = 0)."))
    a = run.audit
    if a is None:
        out.append(note("Not audited: `fedfactory audit RUN_DIR` measures memorization and membership inference."))
        return "".join(out) + "</section>"
    out.append(f'<p>Audit ({esc(a.get("non_members", ""))} as non-members): membership-inference AUC at most '
               f'<b>{fmt(a["mia_auc_max"], 3)}</b> (0.5 is chance), near-copy fraction at most '
               f'<b>{fmt(a["copy_fraction_max"], 4)}</b> (nearest training image closer than '
               f'{fmt(a.get("near_copy_ratio"), 3)} of the nearest held-out one).</p>')
    rows = []
    for r in a["modules"]:
        lo, hi = r["mia_auc_interval"]
        white = f' (white box {fmt(r["mia_auc_white_box"], 3)})' if "mia_auc_white_box" in r else ""
        guarantee = (guarantees or {}).get(r["module_id"]) or r.get("privacy")
        rows.append([esc(r["module_id"]), esc(guarantee_text(guarantee)),
                     f"{fmt(r['mia_auc'], 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]{white}", fmt(r["copy_fraction"], 4),
                     fmt(r["ratio_quantiles"]["0.5"], 3)])
    out.append(table(["module", "guarantee", "MIA AUC [95% bootstrap]", "near-copy fraction", "median ratio"],
                     rows, "num"))
    return "".join(out) + "</section>"


def section_costs(run: RunFiles) -> str:
    m = run.metrics
    out, row = ["<section><h2>Costs</h2>"], []
    if m is None:
        out.append(note("No metrics.json: no timings or communication totals yet."))
    # Sizes as the run recorded them; the files themselves when the run did not get that far.
    sizes = (m or {}).get("bytes", {}).get("per_module") or {p.stem: p.stat().st_size for p in run.module_paths}
    if m is not None and m.get("bytes"):
        b = m["bytes"]
        per_client = {str(k): int(v) for k, v in b.get("per_client", {}).items()}
        total = int(b.get("total_up", sum(per_client.values())))
        out.append(f"<p>Uploaded by clients in total: <b>{human_bytes(total)}</b> ({fmt(total)} bytes).</p>")
    else:
        per_client = {}
    if sizes:
        v = np.array([int(x) for x in sizes.values()])
        out.append(f"<p>{len(sizes)} module files: {human_bytes(v.sum())} in total, {human_bytes(v.min())} to "
                   f"{human_bytes(v.max())} each (median {human_bytes(float(np.median(v)))}).</p>")
    if m is not None and m.get("timings"):
        t = {str(k): float(v) for k, v in m["timings"].items()}
        phases = [k for k in t if k != "end_to_end"]
        row.append(table(["phase", "seconds"], [[esc(k), fmt(t[k], 2)] for k in phases + (
            ["end_to_end"] if "end_to_end" in t else [])], "num"))
        fig = Figure(figsize=(3.8, 0.25 * len(phases) + 0.9), layout="constrained")
        ax = fig.subplots()
        ax.barh(phases, [t[k] for k in phases], color="#6a8fc4")
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.tick_params(labelsize=8)
        ax.set_title("Time per phase", fontsize=10)
        row.append(img(figure_uri(fig), "Time per phase"))
    if per_client:
        fig = Figure(figsize=(min(7.0, 0.22 * len(per_client) + 1.6), 2.4), layout="constrained")
        ax = fig.subplots()
        ax.bar(list(per_client), [v / 1024 for v in per_client.values()], color="#7fb07f")
        ax.set_xlabel("client")
        ax.set_ylabel("KiB sent")
        ax.tick_params(labelsize=8)
        ax.set_title("Bytes sent per client", fontsize=10)
        row.append(img(figure_uri(fig), "Bytes per client"))
    if 0 < len(sizes) <= 20:
        row.append(table(["module", "bytes"], [[esc(k), fmt(int(v))] for k, v in sizes.items()], "num"))
    if row:
        out.append(f'<div class="figs">{"".join(row)}</div>')
    return "".join(out) + "</section>"


def section_config(run: RunFiles) -> str:
    if run.config_text is None:
        return ""
    seed = f" Root seed <b>{run.config.run.seed}</b>." if run.config is not None else ""
    return (f"<section><h2>Configuration</h2><p>The resolved config.toml of this run.{seed}</p>"
            f"<pre>{esc(run.config_text)}</pre></section>")


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


def write_samples_png(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], path: Path,
                     per_class: int = 10) -> None:
    """samples.png: a grid with one row of synthetic samples per class, written atomically."""
    fig = Figure(figsize=(per_class * 0.6, len(class_names) * 0.6 + 0.2))
    axes = fig.subplots(len(class_names), per_class)
    axes = np.atleast_2d(axes)
    for c, name in enumerate(class_names):
        rows = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(rows):
                picture = images[rows[j]]
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_title(name, fontsize=6, loc="left")
    fig.tight_layout(pad=0.1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


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
