"""The ServerApp's transport: wait for the SuperNodes, push messages and pull their replies within a timeout.

Only bytes and node ids: what a reply means is flower.wire's, whether it is accepted federation.intake's.
"""

import logging
import time

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("fedfactory")


def wait_for_nodes(grid: Grid, count: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    """Node ids once `count` SuperNodes are connected, or whatever is connected when `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll_s)


def connected_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    """The SuperNodes that connected within wait_s: none is an error, fewer than count goes on without the rest."""
    nodes = wait_for_nodes(grid, count, wait_s)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within flower.wait_nodes={wait_s}s")
    if len(nodes) < count:
        log.info("only %d of %d SuperNodes connected within %.0fs; going on without the others", len(nodes), count,
                 wait_s)
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout_s: float,
             poll_s: float = 0.5) -> tuple[list[Message], dict[str, int], list[int]]:
    """Push the messages, pull replies until all arrived or `timeout_s` passed.

    Returns the replies, message id -> destination node (to attribute the SuperLink's own error replies, which
    come from node 0), and the nodes that never answered.
    """
    dst = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    node_of = {mid: node for mid, node in zip(ids, dst, strict=True) if mid}
    silent = [node for mid, node in zip(ids, dst, strict=True) if not mid]  # the push itself failed
    pending, replies = set(node_of), []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        if pending:
            time.sleep(poll_s)
    return replies, node_of, silent + [node_of[mid] for mid in sorted(pending)]
