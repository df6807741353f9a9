"""The modules section: a card per module with its manifest facts and a grid of its first synthetic images (the
images the synthetic training set starts with), and with --show-real the real images of its client and class."""

from pathlib import Path

import numpy as np
import torch

from fedfactory.data.datasets import load_data
from fedfactory.generative.train import sample_module
from fedfactory.modules.ids import module_id
from fedfactory.modules.refusal import ModuleError
from fedfactory.registry import load_registry_file
from fedfactory.report.figures import grid_uri
from fedfactory.report.files import RunFiles, expected_modules
from fedfactory.report.markup import esc, fmt, human_bytes, img, note


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
