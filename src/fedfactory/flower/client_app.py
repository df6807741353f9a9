"""The ClientApp: a SuperNode trains one module per class its partition holds and replies with their bytes.

The node's partition comes from its node config, `partition-id` and `num-partitions`: the Simulation Engine sets
them for each virtual SuperNode; a real SuperNode gets them with `--node-config "partition-id=0 num-partitions=3"`.
Each node loads the dataset itself (data.dataset, data.root) and takes its own partition with the run's seed,
the same split the in-process runner makes, so the modules are the same bits.
"""

import logging
import time

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfactory.config import Config, config_hash
from fedfactory.data.datasets import ImageDataset, load_data
from fedfactory.data.partition import split_clients
from fedfactory.device import select_device
from fedfactory.federation.client import train_client_modules
from fedfactory.flower.run_config import parse_run_config
from fedfactory.flower.wire import TASK, reply_content
from fedfactory.generative.artifact import module_to_bytes

# Flower configures this logger in SuperNode and simulation processes, so these lines reach the node's console.
log = logging.getLogger("flwr")

app = ClientApp()


def node_partition(node_config: dict, num_clients: int) -> int:
    """This node's client id, checked against the run's data.num_clients."""
    k, n = node_config.get("partition-id"), node_config.get("num-partitions")
    if type(k) is not int or type(n) is not int:
        raise ValueError(f"node config must set integer partition-id and num-partitions, got {k!r} and {n!r}; "
                         "start the SuperNode with --node-config 'partition-id=0 num-partitions=3'")
    if n != num_clients:
        raise ValueError(f"node config num-partitions={n} but the run has data.num_clients={num_clients}; "
                         "start one SuperNode per client and give every node num-partitions=data.num_clients")
    if not 0 <= k < n:
        raise ValueError(f"node config partition-id={k} is outside [0, {n})")
    return k


def local_data(cfg: Config, client_id: int) -> ImageDataset:
    """This node's training rows: the dataset loaded here, partition `client_id` taken with the run's seed."""
    train, _ = load_data(cfg.data)
    return train.subset(split_clients(cfg.data, cfg.run.seed, train)[client_id])


def train_modules(data: ImageDataset, client_id: int, cfg: Config, device: torch.device,
                  skip: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Module id -> module file bytes, for every held class not in `skip`."""
    return {m.manifest["module_id"]: module_to_bytes(m.tensors, m.manifest)[0]
            for m in train_client_modules(data, client_id, cfg, device, skip=skip.__contains__)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's modules and reply with their bytes."""
    t0 = time.perf_counter()
    cfg, _ = parse_run_config(context.run_config)
    k = node_partition(dict(context.node_config), cfg.data.num_clients)
    task = msg.content.config_records[TASK]
    skip = frozenset(task.get("skip", []))
    device = select_device(cfg.run.device, cfg.run.threads)
    modules = train_modules(local_data(cfg, k), k, cfg, device, skip)
    seconds = time.perf_counter() - t0
    log.info("fedfactory client %d: trained %d modules, %d bytes, in %.1fs", k, len(modules),
             sum(map(len, modules.values())), seconds)
    return Message(reply_content(k, config_hash(cfg), modules, seconds), reply_to=msg)
