"""benchmarks/factory.py --merge: seeds read by separate runs join into one table only when they are one recipe."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "factory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("factory_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_file(root: Path, name: str, seed: int, accuracy: float, machine: str = "run.threads=2",
                 recipe: str = "classifier.mode=local synthesis.local_real_copies=2", family: str = "aegmm") -> None:
    command = (f"python -m fedfactory.cli run --config fashion-mnist run.out={root / 'runs' / name} "
               f"generator.family={family} "
               f"run.progress=false {recipe} {machine} run.seed={seed}")
    row = {"family": family, "seed": seed, "command": command, "accuracy": accuracy, "centralized_accuracy": None,
           "ratio": None, "train_s": 900.0 + seed, "sample_s": 70.0, "classifier_s": 8000.0,
           "end_to_end_s": 9000.0 + 1000 * seed, "bytes_per_module": 1377374.0, "peak_rss_mib": 2100.0}
    data = {"command": f"python benchmarks/factory.py --seeds {seed} --name {name}", "git_commit": f"{seed}" * 40,
            "git_dirty": False, "rows": [row], "summary": []}
    (root / f"{name}.json").write_text(json.dumps(data))


def test_merge_joins_one_recipes_seeds_and_names_each_source(bench, tmp_path):
    results_file(tmp_path, "r-s0", 0, 0.8969)
    # Another machine setting (worker processes, thread count) is the same recipe.
    results_file(tmp_path, "r-s1", 1, 0.9011, machine="run.threads=2 run.workers=2")
    results_file(tmp_path, "r-s2", 2, 0.8990, machine="run.threads=1")
    # Seed 1's run directory is still there: its download is read from the metrics.json it wrote.
    (tmp_path / "runs" / "r-s1").mkdir(parents=True)
    down = {"0": 12396348, "1": 12396356, "2": 12396356}
    (tmp_path / "runs" / "r-s1" / "metrics.json").write_text(json.dumps({"bytes": {"down_per_client": down}}))
    bench.main(["--merge", "r-s0,r-s1,r-s2", "--name", "r-seeds", "--results", str(tmp_path)])
    merged = json.loads((tmp_path / "r-seeds.json").read_text())
    assert [r["seed"] for r in merged["rows"]] == [0, 1, 2]
    (entry,) = merged["summary"]
    assert entry["seeds"] == 3
    assert entry["accuracy_mean"] == pytest.approx(statistics.mean([0.8969, 0.9011, 0.8990]))
    assert entry["accuracy_std"] == pytest.approx(statistics.stdev([0.8969, 0.9011, 0.8990]))
    assert entry["end_to_end_s_mean"] is None  # seconds of different machines do not average into a timing
    assert [m["git_commit"] for m in merged["merged"]] == ["0" * 40, "1" * 40, "2" * 40]
    assert [r["bytes_down_per_client"] for r in merged["rows"]] == [None, [12396348, 12396356], None]
    text = (tmp_path / "r-seeds.md").read_text()
    assert "| aegmm | 3 | 0.8990 ± 0.0021 | - | - | - |" in text
    assert "seed 0: -; seed 1: 12,396,348 to 12,396,356; seed 2: -" in text
    assert "- `r-s1`: Command: `python benchmarks/factory.py --seeds 1 --name r-s1` at commit `111111111111`" in text


@pytest.mark.parametrize("second, message", [
    (dict(seed=1, accuracy=0.9, recipe="classifier.mode=local synthesis.local_real_copies=1"), "differ in more than"),
    (dict(seed=0, accuracy=0.9), "must name its own seed"),
])
def test_merge_refuses_two_recipes_or_a_repeated_seed(bench, tmp_path, second, message):
    results_file(tmp_path, "a", 0, 0.8969)
    results_file(tmp_path, "b", **second)
    with pytest.raises(SystemExit, match=message):
        bench.main(["--merge", "a,b", "--name", "ab", "--results", str(tmp_path)])
    assert not (tmp_path / "ab.json").exists()


def test_merge_keeps_each_family_apart(bench, tmp_path):
    for family, accuracy in (("aegmm", 0.89), ("edm", 0.80)):
        for seed in (0, 1):
            results_file(tmp_path, f"{family}-s{seed}", seed, accuracy + 0.01 * seed, family=family)
    bench.main(["--merge", "aegmm-s0,aegmm-s1,edm-s0,edm-s1", "--name", "both", "--results", str(tmp_path)])
    summary = json.loads((tmp_path / "both.json").read_text())["summary"]
    assert [(s["family"], s["seeds"], round(s["accuracy_mean"], 4)) for s in summary] == [("aegmm", 2, 0.895),
                                                                                          ("edm", 2, 0.805)]


def test_merge_names_a_missing_or_corrupt_file_and_an_option_it_would_ignore(bench, tmp_path):
    results_file(tmp_path, "a", 0, 0.8969)
    (tmp_path / "cut.json").write_text('{"rows": [')
    (tmp_path / "other.json").write_text('{"methods": []}')
    for argv, message in ((["--merge", "a,nope"], "nope.json does not exist"),
                          (["--merge", "a,cut"], "cut.json is not a results file"),
                          (["--merge", "a,other"], "other.json is not a results file"),
                          (["--merge", "a"], "at least two"),
                          (["--merge", "a,a", "--seeds", "0,1"], "takes no --seeds"),
                          (["--merge", "a,a", "run.threads=1"], "takes no overrides")):
        with pytest.raises(SystemExit, match=message):
            bench.main([*argv, "--name", "x", "--results", str(tmp_path)])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_a_local_mode_row_records_what_each_client_downloads(bench, tmp_path):
    bench.main(["--config", "tiny", "--name", "t", "--seeds", "0", "--runs", str(tmp_path / "runs"), "--results",
                str(tmp_path), "classifier.mode=local"])
    (row,) = json.loads((tmp_path / "t.json").read_text())["rows"]
    metrics = json.loads((tmp_path / "runs" / "t-aegmm-seed0" / "metrics.json").read_text())
    per_module = metrics["bytes"]["per_module"].values()
    # Silos: each client downloads every module but its own.
    assert row["bytes_down_per_client"] == [sum(per_module) - max(per_module), sum(per_module) - min(per_module)]
    assert row["mode"] == "local" and row["seed"] == 0
