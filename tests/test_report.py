import base64
import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fedfactory.cli import main
from fedfactory.report import REPORT_NAME, write_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (apt-get install chromium): the in-browser report check is skipped")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars")

# Injected before the report's Content-Security-Policy (a meta CSP governs only what follows it), so it runs and
# sees every failed load and every load the policy blocks; on `load` it writes its findings into the DOM.
PROBE = """<script>
window.__probe = {failed: [], blocked: []};
addEventListener("error", e => { const t = e.target;
  __probe.failed.push(t && t.tagName ? t.tagName + " " + (t.src || t.href || "") : String(e.message)); }, true);
document.addEventListener("securitypolicyviolation",
  e => __probe.blocked.push(e.blockedURI + " " + e.violatedDirective));
addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    failed: __probe.failed, blocked: __probe.blocked,
    fetched: performance.getEntriesByType("resource").map(r => r.name),
    images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0})),
    headline: (document.getElementById("headline-accuracy") || {}).textContent || null,
  });
  document.body.appendChild(out);
});
</script>"""


def copy_run(src: Path, dst: Path, pieces=("config.toml", "partition.json", "metrics.json", "modules")) -> Path:
    dst.mkdir()
    for name in pieces:
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)
    return dst


def image_sources(text: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', text)


def chromium(profile: Path, *args: str) -> str:
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def probe(page: Path, report: str, profile: Path) -> dict:
    """Open a copy of the report with the probe in headless Chromium and return the probe's findings."""
    page.write_text(report.replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE, 1), encoding="utf-8")
    dom = chromium(profile, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_run_writes_a_self_contained_report(tiny_run):
    _, metrics, out = tiny_run
    text = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert f'<b id="headline-accuracy">{metrics["accuracy"]:.4f}</b>' in text
    for heading in ("Results", "Partition", "Modules", "Costs", "Configuration"):
        assert f"<h2>{heading}</h2>" in text
    assert "could not be drawn" not in text and "Missing or unreadable" not in text
    assert "Synthetic images only" in text and 'alt="real samples"' not in text
    # Every image is an embedded PNG; nothing points outside the file, and the page forbids it anyway.
    sources = image_sources(text)
    assert text.count("<img ") == len(sources) == 5 + 10  # figures + one grid per module
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(href|src)=\"(?!data:)", text) and "url(" not in text
    assert "default-src 'none'" in text
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_show_real_puts_real_images_next_to_each_module(tiny_run, tmp_path):
    *_, out = tiny_run
    text = write_report(copy_run(out, tmp_path / "run"), show_real=True).read_text(encoding="utf-8")
    assert text.count('alt="real samples"') == text.count('alt="synthetic samples"') == 10
    assert "Synthetic images only" not in text


def test_interrupted_run_gives_a_report_of_what_exists(tiny_run, tmp_path):
    *_, out = tiny_run
    part = copy_run(out, tmp_path / "part", ("config.toml", "partition.json"))
    (part / "modules").mkdir()
    for k in range(3):
        shutil.copy(out / "modules" / f"client-{k:03d}_class-{k:03d}.safetensors", part / "modules")
    # A module cut short, as a copy from a crashed writer would be: it is refused, not a traceback.
    broken = (out / "modules" / "client-003_class-003.safetensors").read_bytes()
    (part / "modules" / "client-003_class-003.safetensors").write_bytes(broken[: len(broken) // 2])
    text = write_report(part).read_text(encoding="utf-8")
    assert "Missing or unreadable pieces" in text and "metrics.json is missing" in text
    assert "No metrics.json" in text and "headline-accuracy" not in text
    assert "4 of 10 modules" in text and "client-009_class-009" in text  # listed as missing
    assert text.count('alt="synthetic samples"') == 3 and "refused:" in text
    assert "could not be drawn" not in text

    # Malformed pieces become notes too: unreadable JSON, and JSON without the fields a section needs.
    (part / "partition.json").write_text("{not json")
    (part / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    text = write_report(part).read_text(encoding="utf-8")
    assert "partition.json is unreadable" in text
    assert "<h2>Results</h2><p class=\"note\">This section could not be drawn" in text


def test_comparison_and_unlearning_sections_render_when_present(tiny_run, tmp_path):
    *_, out = tiny_run
    rd = copy_run(out, tmp_path / "run")
    row = {"rounds": 1, "accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9, "auroc": 0.99,
           "bytes_up": 1000, "bytes_down": 0, "bytes_total": 1000, "wall_s": 1.5}
    (rd / "comparison.json").write_text(json.dumps({"methods": [
        {"method": "factory", **row}, {"method": "fedavg", **row, "rounds": 50, "accuracy": 0.4, "bytes_total": 9e8}]}))
    per_class = {str(c): 0.9 for c in range(10)}
    (rd / "unlearning.json").write_text(json.dumps({
        "client": 3, "removed_modules": ["client-003_class-003"], "registry_sha256": "ab" * 32,
        "before": {"per_class_accuracy": per_class}, "after": {"per_class_accuracy": per_class | {"3": 0.0}}}))
    text = write_report(rd).read_text(encoding="utf-8")
    assert "<h2>Comparison</h2>" in text and "<b>factory</b>" in text and "fedavg" in text
    assert 'alt="Accuracy vs bytes"' in text
    assert "<h2>Unlearning certificate</h2>" in text and "ab" * 32 in text
    assert 'alt="Per-class accuracy before and after"' in text
    assert "could not be drawn" not in text


def test_cli_report_and_its_errors(tiny_run, tmp_path, capsys):
    *_, out = tiny_run
    rd = copy_run(out, tmp_path / "run")
    assert main(["report", str(rd)]) == 0
    assert capsys.readouterr().out.strip() == str(rd / REPORT_NAME)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@needs_chromium
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    _, metrics, out = tiny_run
    report = out / REPORT_NAME
    text = report.read_text(encoding="utf-8")
    found = probe(tmp_path / "probe.html", text, tmp_path / "profile")
    assert found["failed"] == [] and found["blocked"] == [] and found["fetched"] == []
    assert len(found["images"]) == text.count("<img ") and all(i["ok"] for i in found["images"]), found["images"]
    assert found["headline"] == f"{metrics['accuracy']:.4f}"

    # The report itself (not the probe copy) as a screenshot and as a printed PDF.
    png, pdf = tmp_path / "report.png", tmp_path / "report.pdf"
    chromium(tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={png}", report.as_uri())
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 1600)
    chromium(tmp_path / "profile", "--no-pdf-header-footer", f"--print-to-pdf={pdf}", report.as_uri())
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(re.findall(rb"/Type\s*/Page\b", data)) >= 2


@needs_chromium
def test_probe_catches_a_failed_load(tmp_path):
    # The probe must not pass vacuously: a missing file and a remote image are both reported.
    page = ('<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            "content=\"default-src 'none'; img-src data:\"></head><body>"
            '<img src="missing.png" alt="a"><img src="https://example.invalid/x.png" alt="b"></body></html>')
    found = probe(tmp_path / "bad.html", page, tmp_path / "profile")
    assert len(found["failed"]) == 2 and len(found["blocked"]) == 2
    assert [i["ok"] for i in found["images"]] == [False, False]


def test_sites_section_says_what_was_trusted_and_what_each_site_weighs(tiny_run, tmp_path):
    *_, out = tiny_run
    rd = copy_run(out, tmp_path / "run")
    metrics = json.loads((rd / "metrics.json").read_text())
    site = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.4, "auroc": 0.9, "num_test": 20}
    unpinned = metrics | {
        "trust": {"pinned": False, "note": "no pin file (flower.pins): site names were trusted as reported"},
        "site_shares": {"site-a": {"3": {"images": 30, "image_share": 0.75, "synthetic": 75, "synthetic_share": 0.75}}},
        "bytes": {"per_client": {"site-a": 3072}, "modules_per_client": {"site-a": 1}},
        "evaluation": {"per_site": {"site-a": site}, "declared_test_images": {"site-a": 20, "site-b": 9},
                       "failed_sites": {"site-b": "site site-b scored 90 test images but declared 9 before scoring"}}}
    (rd / "metrics.json").write_text(json.dumps(unpinned))
    text = html.unescape(write_report(rd).read_text(encoding="utf-8"))
    assert "<h2>Sites: trust and influence</h2>" in text and "Not pinned: no pin file (flower.pins)" in text
    assert "<td>site-a</td><td>3</td><td>30</td><td>0.750</td><td>75</td><td>0.750</td>" in text
    # what the site holds, sent and scored, in one row
    assert "<td>site-a</td><td>3 30</td><td>1</td><td>3.0 KiB</td><td>20</td><td>0.5000</td>" in text
    assert "<b>pooled</b>" in text and "declared 9 before scoring" in text and "could not be drawn" not in text
    pinned = unpinned | {"trust": {"pinned": True, "pin_file": "/srv/federation.toml", "sites": {"site-a": 11},
                                   "note": "names bound to node ids"}}
    (rd / "metrics.json").write_text(json.dumps(pinned))
    text = html.unescape(write_report(rd).read_text(encoding="utf-8"))
    assert "Pinned by <code>/srv/federation.toml</code>: site-a (node 11)" in text and "Not pinned" not in text
