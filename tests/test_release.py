"""The release check: a module that replays its training images never leaves its site."""

import json

import numpy as np
import pytest
import torch

from fedfactory.audit import NEAR_COPY_RATIO, near_copy_ratios, release_check
from fedfactory.config import ConfigError, load_config
from fedfactory.data.datasets import load_dataset
from fedfactory.federation.client import client_plans, train_client_modules
from fedfactory.federation.runner import run
from fedfactory.federation.unlearning import unlearn


def client_with(counts: dict[int, int]):
    """A client holding the first counts[c] digits of each class c (8x8)."""
    train, _ = load_dataset("digits", image_size=8)
    rows = np.concatenate([np.flatnonzero(train.labels == c)[:n] for c, n in counts.items()])
    return train.subset(np.sort(rows))


def test_a_module_built_to_replay_is_withheld_and_a_large_cell_is_released():
    # One image: a model of it is that image. Two images and 300 steps: the autoencoder reproduces both.
    cfg = load_config("tiny", ["generator.steps=300", "generator.min_samples=1"])
    client = client_with({0: 1, 1: 2, 2: 140})
    trained = {t.module.manifest["module_id"]: t for t in
               train_client_modules(client, client_plans(client, 0, cfg), cfg, torch.device("cpu"))}
    one, two, large = (trained[f"client-000_class-00{c}"].release for c in range(3))
    assert not one["released"] and one["copy_fraction"] == 1.0 and one["reference"].startswith("none")
    assert not two["released"] and two["copy_fraction"] > cfg.release.max_copy_fraction
    assert large["released"] and large["copy_fraction"] <= cfg.release.max_copy_fraction
    assert large["num_synthetic"] == 2000 and set(large["ratio_quantiles"]) >= {"0.05", "0.5"}
    # Deterministic: the same module gets the same verdict (the samples are the run seed's).
    module = trained["client-000_class-001"].module
    members = client_with({1: 2}).images
    assert release_check(module, members, cfg.run.seed, cfg.release.max_copy_fraction) == two


def test_the_reference_is_the_second_nearest_training_image_whatever_a_site_holds():
    # Copies of training images have ratio 0. Unseen images of the class are no copies, and their ratios stay where
    # they are whether the site holds 20 training images of the class or all of them: both distances come from one
    # set, so the verdict does not move with set sizes as a ratio against a held-out set does.
    train, test = load_dataset("digits", image_size=8)
    for c in (1, 4):
        members, fresh = train.images[train.labels == c], test.images[test.labels == c]
        ratio, reference = near_copy_ratios(members[:50], members)
        assert reference == "second-nearest training image" and (ratio < 1e-6).all()
        medians = []
        for n in (20, 60, len(members)):
            ratio, _ = near_copy_ratios(fresh, members[:n])
            assert (ratio < NEAR_COPY_RATIO).mean() == 0
            medians.append(np.median(ratio))
        assert max(medians) - min(medians) < 0.1 and min(medians) > 0.8


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_the_threshold_is_refused_out_of_range(value):
    with pytest.raises(ConfigError, match=rf"release.max_copy_fraction={value}: must lie in \[0, 1\]"):
        load_config("tiny", [f"release.max_copy_fraction={value}"])


@pytest.mark.slow
def test_a_run_with_a_withheld_module_records_it_unlearns_and_verifies(tmp_path):
    # Dirichlet alpha 0.1 over 3 clients gives five cells of one image; min_samples=1 lets them train.
    out = tmp_path / "run"
    cfg = load_config("tiny", [f"run.out={out}", "data.partition=dirichlet", "data.alpha=0.1", "data.num_clients=3",
                               "generator.min_samples=1", "reference.centralized=false"])
    metrics = run(cfg)
    withheld = metrics["release"]["withheld"]
    assert withheld, "this split should give a replaying cell"
    records = json.loads((out / "release.json").read_text())
    assert all(not records[mid]["released"] and mid not in metrics["modules"] for mid in withheld)
    assert metrics["release"]["checked"] == len(records) == len(metrics["modules"]) + len(withheld)
    assert "Release check" in (out / "report.html").read_text()
    # Unlearning a client that keeps a withheld module elsewhere: the verdicts are reproduced from scratch.
    client = next(k for k in range(3) if not any(mid.startswith(f"client-{k:03d}_") for mid in withheld))
    cert = unlearn(out, clients=(client,), out=tmp_path / "u", verify=True)
    assert cert["verified"], cert["verification"]["summary"]
    after = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert after["release"]["withheld"] == withheld
    assert cert["withheld_modules"] == sorted(withheld)


def test_a_flower_client_never_sends_a_withheld_module_and_the_server_records_it(tmp_path):
    pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")
    import time

    from flwr.app import Metadata
    from flwr.app.message import make_message

    from fedfactory.config import config_hash
    from fedfactory.federation.records import Roster
    from fedfactory.federation.runner import read_release, record_release
    from fedfactory.flower.client_app import train_modules
    from fedfactory.flower.server_app import collect
    from fedfactory.flower.wire import reply_content

    cfg = load_config("tiny", ["generator.min_samples=1"])
    data = client_with({0: 1, 2: 140})
    modules, release = train_modules(data, 0, cfg, torch.device("cpu"))
    assert list(modules) == ["client-000_class-002"]  # the one-image module's bytes never leave the site
    assert [r["module_id"] for r in release if not r["released"]] == ["client-000_class-000"]
    md = Metadata(run_id=1, message_id="rep-1", src_node_id=1, dst_node_id=0, reply_to_message_id="ins-1",
                  group_id="", created_at=time.time(), ttl=600.0, message_type="train")
    reply = make_message(metadata=md, content=reply_content(0, config_hash(cfg), modules, 1.0, release))
    histogram = np.zeros((1, 10), np.int64)
    histogram[0, 0], histogram[0, 2] = 1, 140
    (tmp_path / "modules").mkdir()
    roster = Roster(config_hash(cfg), data.class_names, cfg.generator.min_samples, histogram=histogram)
    got, _ = collect([reply], {"ins-1": 1}, roster, cfg, tmp_path / "modules")
    assert got.accepted[0] == ["client-000_class-002"] and not got.errors
    record_release(tmp_path, list(got.release.values()))
    assert read_release(tmp_path)["client-000_class-000"]["released"] is False
    # A record for a module the client does not hold is refused, with the reason.
    forged = reply_content(0, config_hash(cfg), modules, 1.0, [release[0] | {"module_id": "client-000_class-005"}])
    got, _ = collect([make_message(metadata=md, content=forged)], {"ins-1": 1}, roster, cfg, tmp_path / "modules")
    assert "release records refused" in got.errors[0]["reason"] and not got.release
