"""The sections about the run itself: header, results, partition, comparison, unlearning, costs, configuration.

Each returns HTML from the run's files; a malformed input file raises, and page.guarded turns the section into a
note."""

import json

import numpy as np
from matplotlib.figure import Figure

from fedfactory.report.figures import bars, figure_uri, heatmap
from fedfactory.report.files import RunFiles
from fedfactory.report.markup import HEADLINE_KEYS, esc, fmt, human_bytes, img, note, table


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
