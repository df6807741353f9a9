"""`fedfactory compare` on the tiny preset: the three files, resume, local mode's product of experts and bytes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedfactory.classifier import TrainingError, classifier_from_state
from fedfactory.cli import main
from fedfactory.config import ClassifierConfig, ConfigError, load_config
from fedfactory.data.images import ImageDataset
from fedfactory.device import select_device
from fedfactory.federation import compare as compare_module
from fedfactory.federation import runner
from fedfactory.federation.compare import COLUMNS, METHODS, compare, parse_methods
from fedfactory.federation.factory import combine_experts, expert_recipe, local_training_set, product_of_experts
from fedfactory.registry import load_registry

SETTINGS = ["baselines.rounds=2", "baselines.local_steps=2", "baselines.batch_size=16"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "tiny"
    cfg = load_config("tiny", [f"run.out={out}", *SETTINGS])
    return cfg, compare(cfg, "factory-server,factory-local,fedavg,centralized"), out


def read_json(path):
    return json.loads(path.read_text())


def test_compare_writes_json_markdown_png_and_the_report(compared):
    cfg, doc, out = compared
    saved = read_json(out / "comparison.json")
    assert saved == json.loads(json.dumps(doc))
    rows = saved["methods"]
    assert [r["method"] for r in rows] == ["factory-server", "factory-local", "fedavg", "centralized"]
    for r in rows:
        assert set(COLUMNS) <= r.keys() and r["bytes_total"] == r["bytes_up"] + r["bytes_down"]
        assert r["config_hash"] == saved["config_hash"] and r["wall_s"] > 0
    md = (out / "comparison.md").read_text()
    assert all(f"| {r['method']} | " in md for r in rows)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert "<h2>Comparison</h2>" in report and "<td>factory-local</td>" in report

    # factory-server is the run `fedfactory run` would make here: same metrics.json, same bytes up.
    metrics = read_json(out / "metrics.json")
    server = rows[0]
    assert server["accuracy"] == metrics["accuracy"] and server["bytes_up"] == metrics["bytes"]["total_up"]
    assert server["bytes_down"] == 0
    sizes = {p.stem: p.stat().st_size for p in (out / "modules").glob("*.safetensors")}
    assert server["bytes_up"] == sum(sizes.values())


def test_factory_local_counts_every_other_clients_modules_down(compared):
    cfg, doc, out = compared
    local = next(r for r in doc["methods"] if r["method"] == "factory-local")
    nested = out / "factory-local"
    assert (nested / "config.toml").is_file() and load_config(str(nested / "config.toml")).classifier.mode == "local"
    assert sorted(p.name for p in (nested / "experts").iterdir()) == [f"client-{k:03d}.safetensors" for k in range(10)]
    sizes = {p.stem: p.stat().st_size for p in (out / "modules").glob("*.safetensors")}
    for k in range(10):
        others = sum(n for mid, n in sizes.items() if not mid.startswith(f"client-{k:03d}_"))
        assert local["bytes_per_client"]["down"][str(k)] == others
    assert local["bytes_down"] == 9 * sum(sizes.values())  # silos: one module per client, 9 others each
    # The nested run shares the module files (hard links or copies of the same bytes).
    for p in (nested / "modules").iterdir():
        assert p.read_bytes() == (out / "modules" / p.name).read_bytes()


def test_a_second_compare_skips_finished_methods_and_keeps_an_interrupted_ones_results(compared, monkeypatch):
    cfg, doc, out = compared
    before = read_json(out / "comparison.json")
    metrics_before = (out / "metrics.json").read_bytes()
    calls = []
    real = compare_module.run_baseline

    def spy(method, *args, **kwargs):
        calls.append(method)
        if method == "scaffold":
            raise KeyboardInterrupt  # an interruption in the middle of the second new method
        return real(method, *args, **kwargs)

    monkeypatch.setattr(compare_module, "run_baseline", spy)
    monkeypatch.setattr(compare_module, "run_factory", lambda *a, **k: pytest.fail("factory rerun"))
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, "factory-server,fedavg,local-only,scaffold,centralized")
    assert calls == ["local-only", "scaffold"]
    partial = read_json(out / "comparison.json")
    assert [r["method"] for r in partial["methods"]] == ["factory-server", "factory-local", "fedavg", "centralized",
                                                         "local-only"]
    assert [r for r in partial["methods"] if r["method"] != "local-only"] == before["methods"]
    assert (out / "metrics.json").read_bytes() == metrics_before

    calls.clear()
    monkeypatch.setattr(compare_module, "run_baseline", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    resumed = compare(cfg, "local-only,fedavg")
    assert calls == [] and resumed["methods"] == partial["methods"]


def test_product_of_experts_is_the_normalised_sum_of_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3 for _ in range(3)]
    log_probs = [lg.log_softmax(1).numpy() for lg in logits]
    expected = torch.stack([lg.log_softmax(1) for lg in logits]).sum(0).softmax(1).numpy()
    np.testing.assert_allclose(product_of_experts(log_probs), expected, rtol=1e-12)
    # Confident experts that disagree: every class's summed log-probability is near -1e3, where a plain
    # exp(sum) / sum(exp(sum)) is 0 / 0; the log-sum-exp shift keeps it finite and exact.
    a = torch.tensor([[1e3, 0.0, 2.0]], dtype=torch.float32).log_softmax(1)
    b = torch.tensor([[0.0, 1e3, 1.0]], dtype=torch.float32).log_softmax(1)
    huge = [a.double().numpy(), b.double().numpy()]
    total = np.sum(huge, 0)
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.exp(total) / np.exp(total).sum(1, keepdims=True)).all()
    p = product_of_experts(huge)
    np.testing.assert_allclose(p, torch.from_numpy(total).softmax(1).numpy(), rtol=1e-12)
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
    # One expert is its own product.
    single = logits[0].log_softmax(1).numpy()
    np.testing.assert_allclose(product_of_experts([single]), np.exp(single), rtol=1e-12)


def test_local_training_set_fills_every_class_up_to_samples_per_class(compared):
    cfg, _, out = compared
    registry = load_registry(out / "modules")
    # A client with 30 real images of class 2 and 50 of class 5 (samples_per_class is 40 in the tiny preset).
    images = np.zeros((80, 8, 8, 1), np.uint8)
    labels = np.array([2] * 30 + [5] * 50, np.int64)
    client = ImageDataset(images, labels, tuple(str(c) for c in range(10)), "toy")
    x, y, plan = local_training_set(client, registry, 40, cfg.run.seed, select_device("cpu"), 100)
    counts = np.bincount(y, minlength=10)
    assert counts[2] == 40 and counts[5] == 50 and all(counts[c] == 40 for c in range(10) if c not in (2, 5))
    assert (x[:80] == images).all() and (y[:80] == labels).all()  # the real images come first, unchanged
    assert plan["client-002_class-002"] == 10 and "client-005_class-005" not in plan
    # synthesis.local_synthetic="all": every class gets 40 synthetic images on top of the real ones, its own too.
    x, y, plan = local_training_set(client, registry, 40, cfg.run.seed, select_device("cpu"), 100, fill="all")
    counts = np.bincount(y, minlength=10)
    assert counts[2] == 70 and counts[5] == 90 and all(counts[c] == 40 for c in range(10) if c not in (2, 5))
    assert plan["client-005_class-005"] == 40 and (x[:80] == images).all()
    # synthesis.local_real_copies=2: the real images twice, the same synthetic images once (same seeds). Distinct
    # real images, so a copy cannot pass for a synthetic image or for zeros.
    images = np.random.default_rng(0).integers(0, 256, (80, 8, 8, 1), dtype=np.uint8)
    client = ImageDataset(images, labels, tuple(str(c) for c in range(10)), "toy")
    x2, y2, plan2 = local_training_set(client, registry, 40, cfg.run.seed, select_device("cpu"), 100, real_copies=2)
    x1, y1, plan1 = local_training_set(client, registry, 40, cfg.run.seed, select_device("cpu"), 100)
    assert plan2 == plan1 and len(y2) == len(y1) + 80 and np.array_equal(x2[:80], x1[:80])
    assert (x2[80:160] == images).all() and (y2[80:160] == labels).all() and (x2[160:] == x1[80:]).all()
    with pytest.raises(ValueError, match="real_copies=0"):
        local_training_set(client, registry, 40, cfg.run.seed, select_device("cpu"), 100, real_copies=0)


def test_classifier_local_recipe_trains_the_experts_only(tmp_path, monkeypatch):
    # classifier.local_epochs and classifier.local_width: every expert of a local-mode run trains that many epochs
    # at that width, while the centralized reference (like server mode's classifier) keeps classifier.epochs and
    # classifier.width. Recorded at the runner's own calls; the saved experts have the expert's width.
    trained, train = [], runner.train_classifier

    def recording(images, labels, num_classes, cfg, *args, **kwargs):
        trained.append((kwargs.get("desc", ""), cfg.epochs, cfg.width))
        return train(images, labels, num_classes, cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "train_classifier", recording)
    out = tmp_path / "run"
    runner.run(load_config("tiny", [f"run.out={out}", "classifier.mode=local", "classifier.epochs=1",
                                    "classifier.local_epochs=2", "classifier.local_width=12"]))
    assert sorted(trained) == [("centralized", 1, 8)] + [(f"expert {k}", 2, 12) for k in range(10)], trained
    cfg = load_config(str(out / "config.toml"))
    state = load_file(runner.expert_path(out, 0))
    blur = json.loads((out / "metrics.json").read_text())["classifier_input_blur"]
    with pytest.raises(TrainingError, match="width 8"):
        classifier_from_state(state, 1, 10, cfg.classifier, blur)
    classifier_from_state(state, 1, 10, expert_recipe(cfg.classifier), blur)
    assert expert_recipe(ClassifierConfig(epochs=3)) == ClassifierConfig(epochs=3)  # 0: the classifier's own
    for key in ("local_epochs", "local_width"):
        with pytest.raises(ConfigError, match=f"classifier.{key}=-1"):
            load_config("tiny", [f"classifier.{key}=-1"])


def test_parse_methods_accepts_known_names_only():
    assert parse_methods(None) == list(METHODS)
    assert parse_methods("fedavg, centralized") == ["fedavg", "centralized"]
    with pytest.raises(ValueError, match="valid values are factory-server, factory-local, fedavg"):
        parse_methods("fedavg,fedsgd")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("fedavg,fedavg")


@pytest.mark.parametrize("args, message", [
    (["--methods", "fedavg,fedsgd"], "unknown method 'fedsgd'; valid values are factory-server"),
    (["baselines.rounds=0"], "baselines.rounds=0: must be >= 1"),
    (["baselines.fedprox_mu=-1"], "baselines.fedprox_mu=-1.0: must be >= 0"),
    (["data.partition=natural"], "valid data.partition values for digits: iid, pathological, dirichlet"),
    (["classifier.mode=both"], "classifier.mode='both': valid values are server, local"),
])
def test_bad_compare_input_is_a_one_line_error_and_creates_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compare", "--config", "tiny", f"run.out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_benchmark_script_runs_on_the_tiny_preset(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--config", "tiny", "--name", "tiny", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "res"),
            "--methods", "fedavg,centralized", "baselines.rounds=1", "baselines.local_steps=1"]
    assert bench.main(argv) == 0
    result = read_json(tmp_path / "res" / "compare-tiny.json")
    assert [r["method"] for r in result["methods"]] == ["fedavg", "centralized"]
    assert result["command"].startswith("python benchmarks/compare.py --config tiny")
    assert {"git_commit", "git_dirty"} <= result.keys()
    if (path.parents[1] / ".git").exists():
        assert f"at commit `{result['git_commit'][:12]}`" in (tmp_path / "res" / "compare-tiny.md").read_text()
    assert result["methods"] == [{k: v for k, v in r.items() if k not in ("train_loss", "val_accuracy")}
                                 for r in read_json(tmp_path / "run" / "comparison.json")["methods"]]
    assert "| fedavg | 1 |" in (tmp_path / "res" / "compare-tiny.md").read_text()


def test_holders_rule_scores_each_class_by_the_experts_holding_it():
    gen = torch.Generator().manual_seed(1)
    log_probs = [torch.randn(6, 3, generator=gen, dtype=torch.float64).log_softmax(1).numpy() for _ in range(3)]
    # Silos: expert k holds class k only, so class k's score is expert k's log p_k(k | x).
    silos = np.eye(3) * 50
    expected = torch.from_numpy(np.stack([log_probs[k][:, k] for k in range(3)], 1)).softmax(1).numpy()
    np.testing.assert_allclose(combine_experts(log_probs, silos, "holders"), expected, rtol=1e-12)
    # Shared classes weigh their holders by real images; a class nobody holds falls back to all experts alike.
    held = np.array([[30, 0, 0], [10, 5, 0], [0, 15, 0]])
    score = np.stack([0.75 * log_probs[0][:, 0] + 0.25 * log_probs[1][:, 0],
                      (5 * log_probs[1][:, 1] + 15 * log_probs[2][:, 1]) / 20,
                      sum(lp[:, 2] for lp in log_probs) / 3], 1)
    np.testing.assert_allclose(combine_experts(log_probs, held, "holders"), torch.from_numpy(score).softmax(1).numpy(),
                               rtol=1e-12)
    # "product" ignores the holdings; a wrong shape or an unknown rule is an error that says what is expected.
    np.testing.assert_array_equal(combine_experts(log_probs, held, "product"), product_of_experts(log_probs))
    with pytest.raises(ValueError, match="one row of real-image counts per expert"):
        combine_experts(log_probs, held[:2], "holders")
    with pytest.raises(ValueError, match="the holders rule needs held"):
        combine_experts(log_probs, None, "holders")
    with pytest.raises(ValueError, match="non-negative"):
        combine_experts(log_probs, -held, "holders")
    with pytest.raises(ValueError, match="no expert to combine"):
        combine_experts([], None, "product")
    with pytest.raises(ValueError, match="valid rules are product, holders"):
        combine_experts(log_probs, held, "vote")
