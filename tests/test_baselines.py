"""Weight-sharing baselines on the tiny preset: determinism, equivalences that must hold exactly, byte counts."""

import numpy as np
import pytest
import torch
from safetensors.torch import save
from torch.nn import functional as F

from fedfactory.config import load_config
from fedfactory.data.datasets import load_data
from fedfactory.data.partition import split_clients
from fedfactory.device import select_device
from fedfactory.federation.baselines import (
    client_tensors,
    feddyn_client_state,
    feddyn_server_update,
    initial_model,
    local_sgd,
    run_baseline,
    scaffold_client_control,
    train_federated,
    validation_split,
)

SETTINGS = ["baselines.rounds=2", "baselines.local_steps=2", "baselines.batch_size=16"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny", SETTINGS)
    train, test = load_data(cfg.data)
    return cfg, train, test, split_clients(cfg.data, cfg.run.seed, train), select_device("cpu")


def assert_evaluated_on(metrics: dict, test) -> None:
    cm = np.asarray(metrics["confusion_matrix"])
    assert metrics["num_test"] == cm.sum() == len(test) and cm.sum(1).tolist() == np.bincount(test.labels).tolist()
    assert metrics["accuracy"] == np.trace(cm) / len(test)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_method_is_deterministic_and_reports_what_compare_needs(tiny):
    cfg, train, test, parts, device = tiny
    for method in ("fedavg", "fedprox", "scaffold", "feddyn", "centralized", "local-only"):
        a = run_baseline(method, train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
        b = run_baseline(method, train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
        assert a["metrics"] == b["metrics"] and a["bytes"] == b["bytes"], method
        assert a["rounds"] >= 1
        if method == "local-only":  # the row is the mean over clients of each one's test metrics
            assert a["metrics"]["accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in a["per_client"]]))
        else:  # evaluated once, on the whole real test set
            assert_evaluated_on(a["metrics"], test)
        assert len(a["bytes"]["up_per_client"]) == len(parts) == len(a["bytes"]["down_per_client"])
        if "state" in a:
            assert states_equal(a["state"], b["state"])
    seed0 = run_baseline("fedavg", train, parts, test, cfg.baselines, cfg.classifier, 0, device)
    seed1 = run_baseline("fedavg", train, parts, test, cfg.baselines, cfg.classifier, 1, device)
    assert not states_equal(seed0["state"], seed1["state"])


def test_fedavg_with_one_client_and_a_full_batch_step_is_one_centralized_sgd_step(tiny):
    cfg, train, test, _, device = tiny
    rows = np.arange(200)
    bcfg = load_config("tiny", ["baselines.rounds=1", "baselines.local_steps=1", "baselines.batch_size=512",
                                "baselines.lr=0.1"]).baselines
    result = train_federated("fedavg", train, [rows], test, bcfg, cfg.classifier, cfg.run.seed, device)

    # The same step by hand: the shared initial model, the mean cross-entropy over all 200 rows, w - lr * grad.
    model = initial_model(train, cfg.classifier.width, cfg.run.seed, device)
    x, y = client_tensors(train, rows, device)
    model.train()
    loss = F.cross_entropy(model(x), y)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    with torch.no_grad():
        for name, p in params.items():
            p -= 0.1 * grads[name]
    expected = model.state_dict()
    assert result["state"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    init = initial_model(train, cfg.classifier.width, cfg.run.seed, device).state_dict()
    assert not torch.equal(result["state"]["0.weight"], init["0.weight"])


def test_scaffold_with_zero_control_variates_equals_fedavg_in_round_one_only(tiny):
    cfg, train, test, parts, device = tiny
    one = load_config("tiny", SETTINGS + ["baselines.rounds=1"]).baselines
    fedavg = train_federated("fedavg", train, parts, test, one, cfg.classifier, cfg.run.seed, device)
    # Same batches (stream), so only the algorithm differs: c = c_k = 0 in round 1 makes SCAFFOLD's step FedAvg's.
    scaffold = train_federated("scaffold", train, parts, test, one, cfg.classifier, cfg.run.seed, device,
                               stream="fedavg")
    assert states_equal(fedavg["state"], scaffold["state"])
    two = cfg.baselines
    fedavg2 = train_federated("fedavg", train, parts, test, two, cfg.classifier, cfg.run.seed, device)
    scaffold2 = train_federated("scaffold", train, parts, test, two, cfg.classifier, cfg.run.seed, device,
                                stream="fedavg")
    assert not states_equal(fedavg2["state"], scaffold2["state"])  # round 2 has nonzero control variates


def test_feddyn_server_update_matches_the_formula_on_a_toy_example():
    def t(*v):
        return {"w": torch.tensor(v, dtype=torch.float64)}

    prev, h, alpha = t(1.0, 2.0), t(0.1, -0.1), 0.5
    clients, p = [t(2.0, 2.0), t(0.0, 4.0)], [0.25, 0.75]
    theta, new_h = feddyn_server_update(prev, clients, p, h, alpha)
    # h' = h - alpha * sum_k p_k (theta_k - prev) = (0.1, -0.1) - 0.5 * (-0.5, 1.5)
    torch.testing.assert_close(new_h["w"], torch.tensor([0.35, -0.85], dtype=torch.float64))
    # theta' = sum_k p_k / sum_j p_j theta_k - h' / alpha = (0.5, 3.5) - (0.7, -1.7)
    torch.testing.assert_close(theta["w"], torch.tensor([-0.2, 5.2], dtype=torch.float64))
    # Partial participation: the average is over participants, h moves by their weight of the whole federation.
    theta, new_h = feddyn_server_update(prev, clients[:1], p[:1], h, alpha)
    torch.testing.assert_close(new_h["w"], torch.tensor([0.1 - 0.5 * 0.25, -0.1], dtype=torch.float64))
    torch.testing.assert_close(theta["w"], torch.tensor([2.0, 2.0], dtype=torch.float64) - new_h["w"] / alpha)
    # Client state: g_k <- g_k - alpha (theta_k - theta_received); the invariant h = sum_k p_k g_k follows.
    g = [feddyn_client_state(t(0.0, 0.0), c, prev, alpha) for c in clients]
    _, h_from_zero = feddyn_server_update(prev, clients, p, t(0.0, 0.0), alpha)
    torch.testing.assert_close(h_from_zero["w"], sum(pk * gk["w"] for pk, gk in zip(p, g, strict=True)))


def test_scaffold_option_two_control_update():
    c_k, c = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
    new = scaffold_client_control(c_k, c, {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, num_steps=4, lr=0.1)
    torch.testing.assert_close(new["w"], torch.tensor([1.0 - 0.5 + (2.0 - 1.0) / (4 * 0.1)]))


def test_local_step_adds_drift_and_proximal_pull_to_the_gradient(tiny):
    _, train, _, _, device = tiny
    rows = np.arange(64)
    x, y = client_tensors(train, rows, device)
    model = initial_model(train, 8, 0, device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    anchor = {n: p.detach() + 0.3 for n, p in model.named_parameters()}
    drift = {n: torch.full_like(p, 0.02) for n, p in model.named_parameters()}
    local_sgd(model, x, y, 1, 64, 0.1, "none", torch.Generator().manual_seed(0), drift=drift, anchor=anchor, pull=0.5)

    ref = initial_model(train, 8, 0, device)
    ref.load_state_dict(start)
    ref.train()
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = p.detach() - 0.1 * (g + 0.02 + 0.5 * (p.detach() - anchor[name]))
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-5, atol=1e-6)


def test_byte_counts_are_the_lengths_of_the_serialized_payloads(tiny):
    cfg, train, test, parts, device = tiny
    init = initial_model(train, cfg.classifier.width, cfg.run.seed, device).state_dict()
    params = [n for n, _ in initial_model(train, cfg.classifier.width, cfg.run.seed, device).named_parameters()]
    model_bytes = len(save({f"model.{k}": v.contiguous() for k, v in init.items()}))
    rounds = cfg.baselines.rounds
    fedavg = train_federated("fedavg", train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
    assert fedavg["bytes"]["down_per_client"] == [rounds * model_bytes] * len(parts)
    assert fedavg["bytes"]["up_per_client"] == [rounds * model_bytes] * len(parts)
    assert fedavg["bytes"]["up"] == sum(fedavg["bytes"]["up_per_client"])

    scaffold = train_federated("scaffold", train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
    down = len(save({f"model.{k}": v.contiguous() for k, v in init.items()}
                    | {f"control.{n}": torch.zeros_like(init[n]) for n in params}))
    up = len(save({f"model.{k}": v.contiguous() for k, v in init.items()}
                  | {f"control_delta.{n}": torch.zeros_like(init[n]) for n in params}))
    assert scaffold["bytes"]["down_per_client"] == [rounds * down] * len(parts)
    assert scaffold["bytes"]["up_per_client"] == [rounds * up] * len(parts)

    central = run_baseline("centralized", train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
    assert central["bytes"]["up_per_client"] == [
        len(save({"images": torch.from_numpy(train.images[r]), "labels": torch.from_numpy(train.labels[r])}))
        for r in parts]
    assert central["bytes"]["down"] == 0


def test_partial_participation_counts_only_participants(tiny):
    cfg, train, test, parts, device = tiny
    bcfg = load_config("tiny", SETTINGS + ["baselines.clients_per_round=3", "baselines.rounds=3"]).baselines
    result = train_federated("fedprox", train, parts, test, bcfg, cfg.classifier, cfg.run.seed, device)
    counts = np.zeros(len(parts), int)
    for h in result["history"]:
        assert len(h["clients"]) == 3 == len(set(h["clients"]))
        counts[h["clients"]] += 1
    per_round = result["bytes"]["down"] // 9
    assert result["bytes"]["down_per_client"] == [int(n) * per_round for n in counts]


def test_validation_rows_come_from_the_clients_own_data_and_choose_a_round(tiny):
    cfg, train, test, parts, device = tiny
    train_rows, val_rows = validation_split(parts, 0.25, cfg.run.seed)
    for rows, tr, va in zip(parts, train_rows, val_rows, strict=True):
        assert len(va) == round(0.25 * len(rows)) and not set(tr) & set(va) and set(tr) | set(va) == set(rows)
    bcfg = load_config("tiny", SETTINGS + ["baselines.val_fraction=0.25", "baselines.rounds=3"]).baselines
    result = train_federated("fedavg", train, parts, test, bcfg, cfg.classifier, cfg.run.seed, device)
    sel = result["selected"]
    vals = [h["val_accuracy"] for h in result["history"]]
    assert sel["round"] == 1 + int(np.argmax(vals)) and sel["val_accuracy"] == max(vals)
    assert sel["num_val"] == sum(len(v) for v in val_rows) and result["num_train"] == [len(r) for r in train_rows]


def test_local_only_reports_the_mean_and_the_best_client(tiny):
    cfg, train, test, parts, device = tiny
    result = run_baseline("local-only", train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed, device)
    accs = [m["accuracy"] for m in result["per_client"]]
    assert result["metrics"]["accuracy"] == pytest.approx(np.mean(accs))
    assert result["best"]["accuracy"] == max(accs) and result["best"]["client"] == int(np.argmax(accs))
    assert result["bytes"]["up"] == result["bytes"]["down"] == 0


def test_group_norm_classifier_has_no_statistics_and_fedavg_runs_with_it():
    from torch import nn

    from fedfactory.classifier import build_classifier

    model = build_classifier(1, 10, width=8, norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 5
    assert not list(model.buffers())
    cfg = load_config("tiny", ["classifier.norm=group", "baselines.rounds=2"])
    train, test = load_data(cfg.data)
    parts = split_clients(cfg.data, cfg.run.seed, train)
    result = train_federated("fedavg", train, parts, test, cfg.baselines, cfg.classifier, cfg.run.seed,
                             torch.device("cpu"))
    assert not any("running" in k for k in result["state"])
    assert_evaluated_on(result["metrics"], test)
    with pytest.raises(ValueError, match="valid values are batch, group"):
        build_classifier(1, 10, norm="layer")
