"""The sections on what protects the sites' data and how far their claims were trusted: trust and influence per
site, the release check, and each module's privacy guarantee beside the audit's measurements."""

from fedfactory.report.files import RunFiles
from fedfactory.report.markup import HEADLINE_KEYS, esc, fmt, human_bytes, note, table


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
