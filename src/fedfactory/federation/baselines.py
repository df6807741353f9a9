"""Weight-sharing baselines on the factory's own partition, network, augmentation, test set and metrics.

FedAvg (McMahan et al. 2017), FedProx (Li et al. 2020), SCAFFOLD (Karimireddy et al. 2020, option II control
variates) and FedDyn (Acar et al. 2021) share one local trainer: plain SGD (momentum 0, no weight decay, the
setting of the SCAFFOLD and FedDyn analyses) on cross-entropy, with `classifier.augment` applied per batch.
The algorithms differ only in a linear term added to the gradient and in the server update:

    local gradient = grad L_k(w) + drift + pull * (w - w_global)
    FedAvg: drift = 0, pull = 0;  FedProx: pull = mu;  SCAFFOLD: drift = c - c_k;  FedDyn: drift = -g_k, pull = alpha

Aggregation weights p_k are n_k / n (`baselines.weighting=samples`, FedAvg's choice) or 1 / num_clients
(`uniform`, the SCAFFOLD and FedDyn papers' choice); the server state of SCAFFOLD (c = sum_k p_k c_k) and FedDyn
(h = sum_k p_k g_k) keeps the same weights, so each method minimises the same objective sum_k p_k L_k.
BatchNorm (`classifier.norm=batch`): running means and variances travel with the weights and are averaged with
the same weights as the parameters (num_batches_tracked is rounded); the SCAFFOLD and FedDyn corrections apply to
parameters only. `classifier.norm=group` swaps every BatchNorm for GroupNorm in every method alike, factory
included: no statistics to average, the usual remedy for label skew (Hsieh et al. 2020).

Every byte counted is the length of an actual payload: the tensors a party sends, serialized with safetensors.
The server decodes what clients send and clients start from what they receive, so the count is what was used.
Model selection never looks at the test set: the final round is reported, and with `baselines.val_fraction > 0`
also the round whose global model scores best on validation rows held out from the clients' own training data.

Centralized pools the real data (every client uploads its rows) and trains the factory's classifier recipe
(`classifier.train_classifier`, seed ("classifier",)); local-only runs the FL local trainer for the same number of
rounds with no communication at all, and each client's model is evaluated on the global test set.
"""

import numpy as np
import torch
from safetensors.torch import load
from torch import nn
from torch.nn import functional as F

from fedfactory.classifier import augment, build_classifier, predict_proba, train_classifier
from fedfactory.config import BaselinesConfig, ClassifierConfig
from fedfactory.data.images import ImageDataset, to_float
from fedfactory.metrics import evaluate
from fedfactory.modules.files import tensors_to_bytes
from fedfactory.progress import progress as progress_bar
from fedfactory.seeding import derive_seed, numpy_rng

FEDERATED = ("fedavg", "fedprox", "scaffold", "feddyn")
METHODS = FEDERATED + ("centralized", "local-only")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")

Tensors = dict[str, torch.Tensor]


def to_payload(tensors: Tensors) -> bytes:
    """What goes over the wire: the tensors serialized with safetensors (no pickle)."""
    return tensors_to_bytes(tensors)


def from_payload(data: bytes, device: torch.device) -> Tensors:
    return {k: v.to(device) for k, v in load(data).items()}


def client_weights(sizes: list[int], weighting: str) -> np.ndarray:
    """Aggregation weight p_k of every client: n_k / n ("samples") or 1 / num_clients ("uniform")."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if weighting == "uniform":
        return np.full(len(sizes), 1.0 / len(sizes))
    if weighting == "samples":
        return sizes / sizes.sum()
    raise ValueError(f"weighting={weighting!r}: valid values are samples, uniform")


def validation_split(parts: list[np.ndarray], fraction: float, root_seed: int) -> tuple[list, list]:
    """Each client holds out round(fraction * n_k) of its own rows (at least one row stays for training)."""
    if fraction <= 0:
        return list(parts), [np.zeros(0, np.int64) for _ in parts]
    train_rows, val_rows = [], []
    for k, rows in enumerate(parts):
        order = numpy_rng(root_seed, "baseline", "validation", k).permutation(len(rows))
        n_val = min(int(round(fraction * len(rows))), len(rows) - 1)
        val_rows.append(np.sort(rows[order[:n_val]]))
        train_rows.append(np.sort(rows[order[n_val:]]))
    return train_rows, val_rows


def local_steps_per_round(n: int, cfg: BaselinesConfig) -> int:
    """local_steps when set, else local_epochs passes of ceil(n / batch_size) batches (the last may be smaller)."""
    return cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * -(-n // cfg.batch_size)


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_steps: int, batch_size: int, lr: float,
              augment_kind: str, gen: torch.Generator, drift: Tensors | None = None, anchor: Tensors | None = None,
              pull: float = 0.0, noise_std: float = 0.2) -> float:
    """num_steps of plain SGD on the local objective L_k(w) + <drift, w> + pull / 2 * ||w - anchor||^2.

    x: float (n, C, H, W) in [-1, 1], y: int64 (n,), both on the model's device. Batches walk through fresh
    permutations drawn from gen, epoch after epoch. Returns the mean training loss of the steps.
    """
    named = [(name, p) for name, p in model.named_parameters()]
    params = [p for _, p in named]
    use_amp = x.device.type == "cuda"
    model.train()
    losses, batches = [], iter(())
    for _ in range(num_steps):
        b = next(batches, None)
        if b is None:
            batches = iter(torch.randperm(len(x), generator=gen).split(batch_size))
            b = next(batches)
        b = b.to(x.device)
        xb = augment(x[b], augment_kind, gen, noise_std) if augment_kind != "none" else x[b]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(xb), y[b])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for (name, p), g in zip(named, grads, strict=True):
                if drift is not None:
                    g = g + drift[name]
                if pull:
                    g = g + pull * (p - anchor[name])
                p.add_(g, alpha=-lr)
        losses.append(loss.detach())
    return float(torch.stack(losses).mean()) if losses else float("nan")


def average(states: list[Tensors], weights: list[float]) -> Tensors:
    """Weighted average of state dicts (weights sum to 1); integer buffers are rounded back to integers."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first)
            for s, w in zip(states, weights, strict=True):
                acc += w * s[name]
        else:
            acc = torch.round(sum(w * s[name].double() for s, w in zip(states, weights, strict=True))).to(first.dtype)
        out[name] = acc
    return out


def scaffold_client_control(c_k: Tensors, c: Tensors, start: Tensors, end: Tensors, num_steps: int,
                            lr: float) -> Tensors:
    """Option II of Karimireddy et al. 2020, Eq. (4): c_k+ = c_k - c + (x - y_k) / (K * lr)."""
    return {name: c_k[name] - c[name] + (start[name] - end[name]) / (num_steps * lr) for name in c_k}


def feddyn_server_update(previous: Tensors, client_params: list[Tensors], weights: list[float], h: Tensors,
                         alpha: float) -> tuple[Tensors, Tensors]:
    """FedDyn's server step (Acar et al. 2021, Algorithm 1) with aggregation weights p_k of the participants:

    h <- h - alpha * sum_k p_k (theta_k - theta_prev);   theta <- sum_k (p_k / sum_j p_j) theta_k - h / alpha.
    With p_k = 1 / m this is the paper's (1/m for h, 1/|P| for the average).
    """
    total = float(sum(weights))
    new_h, theta = {}, {}
    pairs = list(zip(client_params, weights, strict=True))
    for name, prev in previous.items():
        new_h[name] = h[name] - alpha * sum(w * (cp[name] - prev) for cp, w in pairs)
        theta[name] = sum((w / total) * cp[name] for cp, w in pairs) - new_h[name] / alpha
    return theta, new_h


def feddyn_client_state(g_k: Tensors, trained: Tensors, received: Tensors, alpha: float) -> Tensors:
    """The client's gradient state after a round: g_k <- g_k - alpha * (theta_k - theta_received)."""
    return {name: g_k[name] - alpha * (trained[name] - received[name]) for name in g_k}


def client_tensors(data: ImageDataset, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's rows as float (n, C, H, W) in [-1, 1] and int64 labels, on the device."""
    return (torch.from_numpy(to_float(data.images[rows])).to(device),
            torch.from_numpy(data.labels[rows].astype(np.int64)).to(device))


def initial_model(data: ImageDataset, width: int, root_seed: int, device: torch.device,
                  norm: str = "batch") -> nn.Module:
    """The classifier network every weight-sharing method starts from, seeded by ("baseline", "init")."""
    torch.manual_seed(derive_seed(root_seed, "baseline", "init"))
    return build_classifier(data.images.shape[3], data.num_classes, width, norm=norm).to(device)


def accuracy_on(model: nn.Module, data: ImageDataset, rows: np.ndarray, device: torch.device) -> float:
    return float((predict_proba(model, data.images[rows], device).argmax(1) == data.labels[rows]).mean())


def train_federated(method: str, train: ImageDataset, parts: list[np.ndarray], test: ImageDataset,
                    cfg: BaselinesConfig, clf: ClassifierConfig, root_seed: int, device: torch.device,
                    stream: str | None = None, progress: bool = False) -> dict:
    """Run one weight-sharing method for cfg.rounds rounds; returns test metrics, bytes, per-round history and
    the final global state dict ("state").

    Client k's randomness in round t comes from derive_seed(root_seed, "baseline", stream, t, k); `stream`
    defaults to the method name (naming another method gives both the same batches, for a controlled test).
    """
    if method not in FEDERATED:
        raise ValueError(f"unknown federated method {method!r}; valid values are {', '.join(FEDERATED)}")
    stream = stream or method
    num_clients = len(parts)
    train_rows, val_rows = validation_split(parts, cfg.val_fraction, root_seed)
    data = [client_tensors(train, rows, device) for rows in train_rows]
    p = client_weights([len(rows) for rows in train_rows], cfg.weighting)
    per_round = min(cfg.clients_per_round or num_clients, num_clients)
    all_val = np.concatenate(val_rows)

    model = initial_model(train, clf.width, root_seed, device, clf.norm)
    param_names = [name for name, _ in model.named_parameters()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def zeros() -> Tensors:
        return {name: torch.zeros_like(state[name]) for name in param_names}

    # Server and client states of SCAFFOLD (c, c_k) and FedDyn (h, g_k), over parameters only.
    c, c_k = zeros(), [zeros() for _ in range(num_clients)]
    h, g_k = zeros(), [zeros() for _ in range(num_clients)]
    up, down = [0] * num_clients, [0] * num_clients
    history, best = [], None
    for t in progress_bar(range(1, cfg.rounds + 1), method, "round", progress):
        # Sample the participants (everyone under full participation).
        if per_round < num_clients:
            chosen = np.sort(numpy_rng(root_seed, "baseline", stream, t, "participants").choice(
                num_clients, per_round, replace=False)).tolist()
        else:
            chosen = list(range(num_clients))

        # Broadcast: the global model (parameters and BatchNorm buffers), plus c for SCAFFOLD.
        message = {f"model.{k}": v for k, v in state.items()}
        if method == "scaffold":
            message |= {f"control.{k}": v for k, v in c.items()}
        payload = to_payload(message)

        states, losses, steps, control_deltas = [], [], [], []
        for k in chosen:
            down[k] += len(payload)
            received = from_payload(payload, device)
            start = {name[len("model."):]: v for name, v in received.items() if name.startswith("model.")}
            model.load_state_dict(start)
            anchor = {name: start[name] for name in param_names}
            drift, pull = None, 0.0
            if method == "fedprox":
                pull = cfg.fedprox_mu
            elif method == "scaffold":
                drift = {name: received[f"control.{name}"] - c_k[k][name] for name in param_names}
            elif method == "feddyn":
                drift, pull = {name: -g for name, g in g_k[k].items()}, cfg.feddyn_alpha

            # Local training, seeded per (method, round, client).
            gen = torch.Generator().manual_seed(derive_seed(root_seed, "baseline", stream, t, k))
            x, y = data[k]
            num_steps = local_steps_per_round(len(x), cfg)
            losses.append(local_sgd(model, x, y, num_steps, cfg.batch_size, cfg.lr, clf.augment, gen,
                                    drift=drift, anchor=anchor, pull=pull, noise_std=clf.noise_std))
            steps.append(num_steps)
            trained = {name: v.detach().clone() for name, v in model.state_dict().items()}

            # Reply: the local model, plus the change of c_k for SCAFFOLD; client states update locally.
            reply = {f"model.{name}": v for name, v in trained.items()}
            if method == "scaffold":
                new_c_k = scaffold_client_control(c_k[k], {n: received[f"control.{n}"] for n in param_names},
                                                  anchor, trained, num_steps, cfg.lr)
                reply |= {f"control_delta.{n}": new_c_k[n] - c_k[k][n] for n in param_names}
                c_k[k] = new_c_k
            elif method == "feddyn":
                g_k[k] = feddyn_client_state(g_k[k], trained, anchor, cfg.feddyn_alpha)
            reply_bytes = to_payload(reply)
            up[k] += len(reply_bytes)
            got = from_payload(reply_bytes, device)
            states.append({name[len("model."):]: v for name, v in got.items() if name.startswith("model.")})
            if method == "scaffold":
                control_deltas.append({n: got[f"control_delta.{n}"] for n in param_names})

        # Server update. Averaging with weights p_k / sum_{participants} p_j is FedAvg's step, and SCAFFOLD's
        # with global step size 1 (x + mean(y_k - x) = mean(y_k)).
        w = [float(p[k]) for k in chosen]
        q = [wi / sum(w) for wi in w]
        new_state = average(states, q)
        if method == "scaffold":
            # c <- c + sum_{k in S} p_k dc_k keeps c = sum_k p_k c_k (the paper's (|S|/N) mean with p_k = 1/N).
            c = {n: c[n] + sum(wi * d[n] for wi, d in zip(w, control_deltas, strict=True)) for n in param_names}
        elif method == "feddyn":
            theta, h = feddyn_server_update({n: state[n] for n in param_names},
                                            [{n: s[n] for n in param_names} for s in states], w, h, cfg.feddyn_alpha)
            new_state |= theta
        state = new_state

        # Round bookkeeping: training loss, and validation accuracy on the clients' held-out rows.
        entry = {"round": t, "train_loss": float(np.dot(q, losses)), "clients": chosen, "local_steps": steps}
        if len(all_val):
            model.load_state_dict(state)
            entry["val_accuracy"] = accuracy_on(model, train, all_val, device)
            if best is None or entry["val_accuracy"] > best[0]:
                best = (entry["val_accuracy"], t, {k: v.clone() for k, v in state.items()})
        if not np.isfinite(entry["train_loss"]):
            entry["diverged"] = True
        history.append(entry)

    model.load_state_dict(state)
    final = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
    selected = None
    if best is not None:
        model.load_state_dict(best[2])
        selected = {"round": best[1], "val_accuracy": best[0], "num_val": int(len(all_val)),
                    "metrics": evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)}
    return {"method": method, "rounds": cfg.rounds, "metrics": final, "selected": selected,
            "bytes": {"up_per_client": up, "down_per_client": down, "up": sum(up), "down": sum(down)},
            "history": history, "num_train": [len(r) for r in train_rows], "weights": p.tolist(), "state": state}


def train_centralized(train: ImageDataset, parts: list[np.ndarray], test: ImageDataset, clf: ClassifierConfig,
                      root_seed: int, device: torch.device, progress: bool = False) -> dict:
    """Every client uploads its rows (counted as their safetensors payload); the factory's classifier recipe
    (seed ("classifier",), no input blur) trains on the pool."""
    up = [len(to_payload({"images": torch.from_numpy(train.images[rows]),
                          "labels": torch.from_numpy(train.labels[rows])})) for rows in parts]
    rows = np.sort(np.concatenate(parts))
    model = train_classifier(train.images[rows], train.labels[rows], train.num_classes, clf,
                             derive_seed(root_seed, "classifier"), device, desc="centralized", progress=progress)
    metrics = evaluate(predict_proba(model, test.images, device), test.labels, test.class_names)
    return {"method": "centralized", "rounds": 1, "metrics": metrics,
            "bytes": {"up_per_client": up, "down_per_client": [0] * len(parts), "up": sum(up), "down": 0}}


def train_local_only(train: ImageDataset, parts: list[np.ndarray], test: ImageDataset, cfg: BaselinesConfig,
                     clf: ClassifierConfig, root_seed: int, device: torch.device, progress: bool = False) -> dict:
    """Each client runs the FL local trainer alone from the shared initial model for cfg.rounds rounds (no
    communication); every client's model is evaluated on the global test set. Headline = mean over clients."""
    train_rows, _ = validation_split(parts, cfg.val_fraction, root_seed)
    model = initial_model(train, clf.width, root_seed, device, clf.norm)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    per_client = []
    for k, rows in enumerate(progress_bar(train_rows, "local-only", "client", progress)):
        model.load_state_dict(init)
        x, y = client_tensors(train, rows, device)
        for t in range(1, cfg.rounds + 1):
            gen = torch.Generator().manual_seed(derive_seed(root_seed, "baseline", "local-only", t, k))
            local_sgd(model, x, y, local_steps_per_round(len(x), cfg), cfg.batch_size, cfg.lr, clf.augment, gen,
                      noise_std=clf.noise_std)
        per_client.append(evaluate(predict_proba(model, test.images, device), test.labels, test.class_names))
    mean = {key: mean_of([m[key] for m in per_client]) for key in HEADLINE}
    best = int(np.argmax([m["accuracy"] for m in per_client]))
    return {"method": "local-only", "rounds": cfg.rounds, "metrics": mean,
            "best": {"client": best} | {key: per_client[best][key] for key in HEADLINE},
            "per_client": [{key: m[key] for key in HEADLINE} for m in per_client],
            "bytes": {"up_per_client": [0] * len(parts), "down_per_client": [0] * len(parts), "up": 0, "down": 0}}


def mean_of(values: list) -> float | None:
    """Mean of the defined values (AUROC is undefined for some test sets)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def run_baseline(method: str, train: ImageDataset, parts: list[np.ndarray], test: ImageDataset,
                 cfg: BaselinesConfig, clf: ClassifierConfig, root_seed: int, device: torch.device,
                 progress: bool = False) -> dict:
    """Dispatch one of METHODS by name."""
    if method in FEDERATED:
        return train_federated(method, train, parts, test, cfg, clf, root_seed, device, progress=progress)
    if method == "centralized":
        return train_centralized(train, parts, test, clf, root_seed, device, progress=progress)
    if method == "local-only":
        return train_local_only(train, parts, test, cfg, clf, root_seed, device, progress=progress)
    raise ValueError(f"unknown baseline {method!r}; valid values are {', '.join(METHODS)}")
