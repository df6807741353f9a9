"""Exact modular unlearning on the tiny preset: deletion, re-synthesis, retraining and bit-for-bit verification."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.data.datasets import load_data
from fedfactory.device import select_device
from fedfactory.federation.client import train_client_module
from fedfactory.federation.plan import plan_module
from fedfactory.federation.runner import run
from fedfactory.federation.unlearning import unlearn
from fedfactory.modules.files import save_module
from fedfactory.runs import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def silos(tiny_run) -> Path:
    """The session's tiny run: silos, one class per client."""
    return tiny_run[2]


@pytest.fixture(scope="module")
def dirichlet(tmp_path_factory) -> Path:
    # Seed 7: every held (client, class) has >= 2 images, which the aegmm mixture fit needs.
    out = tmp_path_factory.mktemp("runs") / "dirichlet"
    run(load_config("tiny", [f"run.out={out}", "run.seed=7", "data.partition=dirichlet", "data.num_clients=4",
                             "data.alpha=0.5", "reference.centralized=false", "generator.steps=10",
                             "generator.min_samples=2"]))
    return out


def test_unlearning_a_silo_forgets_its_class_verifiably_and_leaves_the_source_untouched(silos, capsys):
    source = tree_hashes(silos)
    assert main(["unlearn", str(silos), "--client", "3", "--verify"]) == 0
    out = silos.parent / f"{silos.name}-unlearn-client-3"
    assert str(out) in capsys.readouterr().out
    assert tree_hashes(silos) == source
    cert, metrics = read_json(out / "unlearning.json"), read_json(out / "metrics.json")

    # Verified bit for bit against a from-scratch run without client 3.
    assert cert["verified"] is True and cert["verification"]["metrics_identical"]
    assert cert["verification"]["modules_retrained"] == 9
    assert cert["classifier"] == cert["verification"]["classifier"]
    assert cert["classifier"]["file_sha256"] == sha256_file(out / "classifier.safetensors")

    # Class 3 is gone from the plan and the classifier never predicts it correctly.
    assert "client-003_class-003" not in metrics["synthesis_plan"] and metrics["missing_classes"] == ["3"]
    assert metrics["per_class_accuracy"]["3"] == 0.0 == cert["after"]["group_accuracy"]["only_removed"]
    assert cert["class_groups"]["only_removed"] == ["3"] and cert["class_groups"]["shared"] == []

    # The certificate names what went and what stayed, with hashes that match the files.
    (removed,) = cert["removed_modules"]
    assert removed["module_id"] == "client-003_class-003"
    assert removed["file_sha256"] == source["modules/client-003_class-003.safetensors"]
    assert len(removed["weights_sha256"]) == 64
    for m in cert["remaining_modules"]:
        path = f"modules/{m['module_id']}.safetensors"
        assert m["file_sha256"] == source[path] == sha256_file(out / path)
    assert cert["seed"] == 0 and cert["config_hash"] == metrics["config_hash"]

    # Only the whitelist is in the new run; nothing but the remaining modules is a copy of a source file.
    new = tree_hashes(out)
    expected = {f"modules/client-{k:03d}_class-{k:03d}.safetensors" for k in range(10) if k != 3}
    assert set(new) == expected | {"config.toml", "partition.json", "samples.png", "classifier.safetensors",
                                   "metrics.json", "log.txt", "unlearning.json", "report.html", "release.json"}
    assert sorted(read_json(out / "release.json")) == sorted(p.split("/")[1].removesuffix(".safetensors")
                                                               for p in expected)
    assert not {h for p, h in new.items() if p not in expected} & set(source.values())
    assert not any(p.name.startswith(".") for p in silos.parent.iterdir())

    # The centralized reference pools client 3's raw data, so it is off; client 3's rows are withdrawn.
    assert load_config(str(out / "config.toml")).reference.centralized is False and "reference" not in metrics
    assert "disabled" in cert["centralized_reference"] and cert["after"]["centralized_accuracy"] is None
    partition = read_json(out / "partition.json")
    assert partition["indices"][3] == [] and partition["withdrawn_modules"] == ["client-003_class-003"]
    assert partition["indices"][4] == read_json(silos / "partition.json")["indices"][4]


def test_dirichlet_unlearning_reweights_shared_classes_and_verifies_bit_for_bit(dirichlet, tmp_path):
    before = read_json(dirichlet / "metrics.json")["synthesis_plan"]
    # A whole client and one module of another client, whose other modules stay.
    kept_client_module = next(m for m in sorted(before) if m.startswith("client-000_"))
    cert = unlearn(dirichlet, clients=(1,), modules=(kept_client_module,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    assert cert["verification"]["metrics_identical"]

    removed = {m["module_id"] for m in cert["removed_modules"]}
    assert kept_client_module in removed and all(m.startswith(("client-001_", kept_client_module)) for m in removed)
    remaining = {m["module_id"]: m for m in cert["remaining_modules"]}
    assert any(m.startswith("client-000_") for m in remaining)
    plan = cert["after"]["synthesis_plan"]
    assert plan.keys() == remaining.keys() and not removed & plan.keys()

    # Each class's mixture is re-weighted over the remaining holders' real counts n_{k,c}.
    assert cert["class_groups"]["shared"]
    for c in range(10):
        holders = [m for m in remaining.values() if m["class_id"] == c]
        total = sum(m["num_samples"] for m in holders)
        assert sum(plan[m["module_id"]] for m in holders) == (40 if holders else 0)
        for m in holders:
            assert abs(plan[m["module_id"]] - 40 * m["num_samples"] / total) < 1
    shared = [m for m in remaining.values() if m["class_name"] in cert["class_groups"]["shared"]]
    assert any(plan[m["module_id"]] > before[m["module_id"]] for m in shared)
    # Client 1 holds every class in this seeded partition, so no class is untouched.
    assert cert["class_groups"]["rest"] == [] and cert["after"]["group_accuracy"]["rest"] is None
    assert cert["after"]["group_accuracy"]["shared"] == cert["after"]["accuracy"]


def test_unlearning_twice_equals_unlearning_both_at_once(silos, tmp_path):
    unlearn(silos, clients=(1,), out=tmp_path / "a")
    twice = unlearn(tmp_path / "a", clients=(6,), out=tmp_path / "b")
    both = unlearn(silos, clients=(1, 6), out=tmp_path / "c", verify=True)
    assert both["verified"]
    assert twice["classifier"] == both["classifier"]
    assert twice["withdrawn_modules_total"] == both["withdrawn_modules_total"] == ["client-001_class-001",
                                                                                  "client-006_class-006"]
    assert read_json(tmp_path / "b" / "partition.json") == read_json(tmp_path / "c" / "partition.json")
    # Everything but wall-clock timings; class groups differ by design (each is relative to its own request).
    metrics_b, metrics_c = (read_json(tmp_path / d / "metrics.json") for d in "bc")
    assert metrics_b.pop("timings") and metrics_c.pop("timings") and metrics_b == metrics_c


def test_bad_requests_are_one_line_errors_and_change_nothing(silos, tmp_path, capsys):
    source = tree_hashes(silos)
    out = tmp_path / "x"
    cases = [(["--client", "99"], "unknown client 99"), (["--client", "-1"], "unknown client -1"),
             (["--module", "client-000_class-005"], "unknown module client-000_class-005"),
             (["--module", "../modules/evil"], "module id must look like"), ([], "nothing to unlearn")]
    for extra, message in cases:
        assert main(["unlearn", str(silos), "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
    # A client whose modules are already gone, and an out dir that exists.
    unlearn(silos, clients=(4,), out=tmp_path / "u")
    u_files = tree_hashes(tmp_path / "u")
    assert main(["unlearn", str(tmp_path / "u"), "--client", "4", "--out", str(out)]) == 2
    assert "client 4 has no modules" in capsys.readouterr().err
    assert main(["unlearn", str(silos), "--client", "5", "--out", str(tmp_path / "u")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree_hashes(silos) == source and tree_hashes(tmp_path / "u") == u_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


@pytest.mark.slow
def test_local_mode_unlearning_retrains_every_remaining_expert_and_verifies(tmp_path):
    source = tmp_path / "local"
    run(load_config("tiny", [f"run.out={source}", "classifier.mode=local", "reference.centralized=false",
                             "generator.steps=10", "synthesis.samples_per_class=20"]))
    assert sorted(p.name for p in (source / "experts").iterdir()) == [f"client-{k:03d}.safetensors" for k in range(10)]
    hashes = tree_hashes(source)
    cert = unlearn(source, clients=(4,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    assert cert["verification"]["metrics_identical"] and cert["mode"] == "local"
    # Every remaining client retrains; in silos each one had drawn images from client 4's module.
    remaining = [k for k in range(10) if k != 4]
    assert cert["participants"]["clients"] == remaining == cert["participants"]["used_removed_modules"]
    assert sorted(cert["classifier"]["experts"]) == [f"client-{k:03d}" for k in remaining]
    assert cert["classifier"] == cert["verification"]["classifier"]
    metrics = read_json(tmp_path / "u" / "metrics.json")
    assert metrics["experts"] == [str(k) for k in remaining] and "4" not in metrics["bytes"]["down_per_client"]
    assert all("client-004_class-004" not in plan for plan in metrics["synthesis_plan"].values())
    assert tree_hashes(source) == hashes


def test_verification_catches_a_module_that_a_from_scratch_run_would_not_train(silos, tmp_path, capsys):
    # Swap client 2's module for one trained on the same rows with another seed: hashes valid, weights not reproducible.
    forged = tmp_path / "forged"
    shutil.copytree(silos, forged)
    cfg = load_config(str(forged / "config.toml"))
    train, _ = load_data(cfg.data)
    client = train.subset(np.asarray(read_json(forged / "partition.json")["indices"][2]))
    plan = plan_module(load_config(str(forged / "config.toml"), ["run.seed=1"]), 2, 2, int((client.labels == 2).sum()))
    manifest, tensors = train_client_module(client, plan, cfg.generator, select_device("cpu"), progress=False)
    save_module(forged / "modules" / "client-002_class-002.safetensors", tensors, manifest)

    assert main(["unlearn", str(forged), "--client", "0", "--verify", "--out", str(tmp_path / "u")]) == 1
    assert "verification failed" in capsys.readouterr().err
    cert = read_json(tmp_path / "u" / "unlearning.json")
    assert cert["verified"] is False
    assert cert["verification"]["module_mismatches"] == ["client-002_class-002"]
    assert cert["verification"]["first_module_difference"]["module_id"] == "client-002_class-002"
    assert cert["verification"]["first_classifier_difference"]["reason"] == "values differ"


def test_benchmark_script_runs_on_the_tiny_preset(silos, tmp_path):
    spec = importlib.util.spec_from_file_location("unlearning_benchmark", ROOT / "benchmarks" / "unlearning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([str(silos), "--client", "2", "--name", "tiny", "--results", str(tmp_path)]) == 0
    result = read_json(tmp_path / "unlearning-tiny.json")
    assert result["forgotten_classes"] == ["2"] and result["accuracy"]["forgotten"]["after"] == 0.0
    assert result["seconds"]["unlearn"] > 0 and result["ratio"] == pytest.approx(
        result["seconds"]["unlearn"] / result["seconds"]["original_end_to_end"])
    assert {"git_commit", "git_dirty"} <= result.keys() and result["command"].startswith("python benchmarks/unlearning")
    if (ROOT / ".git").exists():
        assert f"at commit `{result['git_commit'][:12]}`" in (tmp_path / "unlearning-tiny.md").read_text()
    assert not (silos.parent / f"{silos.name}-unlearn-client-2").exists()


def client_with_a_small_cell(run_dir: Path) -> int:
    hist = read_json(run_dir / "partition.json")["histogram"]
    return next(k for k, row in enumerate(hist) if any(0 < n < 20 for n in row) and any(n >= 20 for n in row))


@pytest.mark.slow
def test_a_run_with_cells_below_min_samples_unlearns_its_client_entirely_and_verifies(tmp_path):
    # generator.min_samples=20 leaves cells without a module, as in the README's Dirichlet run; local mode is where
    # a withdrawn client's rows in those cells would still matter (its expert trains on its real data). With the
    # holders rule, which weighs the experts by their real counts per class, on classes several clients share.
    source = tmp_path / "local"
    run(load_config("tiny", [f"run.out={source}", "classifier.mode=local", "classifier.combine=holders",
                             "data.partition=dirichlet",
                             "data.num_clients=4", "data.alpha=0.3", "generator.steps=5", "generator.min_samples=20",
                             "reference.centralized=false", "synthesis.samples_per_class=20"]))
    k = client_with_a_small_cell(source)
    cert = unlearn(source, clients=(k,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    assert read_json(tmp_path / "u" / "partition.json")["indices"][k] == []
    # Client k kept real rows in its small cells before the fix, so it still trained an expert on its own data.
    assert f"client-{k:03d}" not in cert["classifier"]["experts"]
    assert k not in cert["participants"]["clients"]
    assert str(k) not in read_json(tmp_path / "u" / "metrics.json")["expert_accuracy"]


def test_verification_requires_identical_metrics(silos, tmp_path, monkeypatch):
    from fedfactory.federation import unlearning

    real = unlearning.verify_from_scratch

    def with_other_metrics(ctx, expected, unlearned_metrics):
        # Bit-identical weights, but the unlearned run's metrics.json claims another accuracy.
        return real(ctx, expected, unlearned_metrics | {"accuracy": -1.0})

    monkeypatch.setattr(unlearning, "verify_from_scratch", with_other_metrics)
    cert = unlearn(silos, clients=(5,), out=tmp_path / "u", verify=True)
    assert cert["verification"]["metrics_identical"] is False
    assert cert["verified"] is False and "metrics" in cert["verification"]["summary"]


@pytest.mark.parametrize("name, edit, message", [
    ("metrics.json", lambda d: d.pop("confusion_matrix"), "is not as fedfactory wrote it (no confusion_matrix)"),
    ("metrics.json", lambda d: d.update(confusion_matrix=[[1, 2], [3]]), "confusion_matrix is not 10 x 10"),
    ("partition.json", lambda d: d.update(indices=[["a"]] * 10), "indices must be lists of row numbers"),
    ("partition.json", None, "is unreadable"),
])
def test_an_edited_source_run_is_refused_in_one_line(silos, tmp_path, capsys, name, edit, message):
    edited = tmp_path / "edited"
    shutil.copytree(silos, edited)
    if edit is None:
        (edited / name).write_text("{not json")
    else:
        doc = read_json(edited / name)
        edit(doc)
        (edited / name).write_text(json.dumps(doc))
    assert main(["unlearn", str(edited), "--client", "1", "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "u").exists(), err
