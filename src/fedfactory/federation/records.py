"""The frozen records of a train round, as plain data: what flower/wire.py decodes from a reply (TrainReply,
ExpertReply, CountsReply and their Payloads, delivered as an Arrival), who may answer (the operator's Pins, the
round's Roster), and what federation/intake.py decides from them (each Claim and Sender, the round's TrainIntake,
the Stale kept modules). The rules live in intake.py; nothing here decides or raises."""

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedfactory.modules.ids import implied_modules


@dataclass(frozen=True)
class Pin:
    """One site of the federation as the operator pins it."""

    name: str
    node_id: int  # the SuperNode id the SuperLink assigned to the site's registered public key
    max_images_per_class: int | None = None
    max_test_images: int | None = None


@dataclass(frozen=True)
class Pins:
    path: str
    sites: tuple[Pin, ...]

    def of(self, name: str) -> Pin | None:
        return next((p for p in self.sites if p.name == name), None)


@dataclass(frozen=True)
class Payload:
    """One module of a reply as it arrived: its id and file bytes, or why they are no module payload (then the bytes
    are never parsed)."""

    module_id: str
    data: bytes = b""
    problem: str | None = None


@dataclass(frozen=True)
class TrainReply:
    """A train reply, decoded (flower.wire.parse_train_reply) but not yet believed: who it says it is, under which
    config, and what it sends.

    A simulation client names its client id; a deployment site its name, its images per class (classes[i] has
    counts[i]) and the test images it will score, or instead the error that kept it from training.
    """

    sender: int | str
    config_hash: str
    modules: tuple[Payload, ...] = ()
    train_seconds: float = 0.0
    classes: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()
    test_images: int = 0
    error: str | None = None
    release: object = None  # the release check's records as decoded JSON (release_records checks them)
    release_problem: str | None = None  # why the release entry did not decode


@dataclass(frozen=True)
class ExpertReply:
    """Local mode's second-round reply, decoded: the site's expert by name (classifier safetensors bytes), or the
    error that kept the site from training it."""

    site: str
    config_hash: str
    weights: dict[str, bytes]
    train_seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class CountsReply:
    """An evaluate reply, decoded: the site and its counts (metrics.score_counts: name -> array), nothing per image."""

    site: str
    config_hash: str
    counts: dict[str, np.ndarray]
    seconds: float = 0.0


@dataclass(frozen=True)
class Arrival:
    """A train reply as the transport delivered it: its node, its size on the wire, and its decoded content or why
    there is none (the node's error, no reply in time, a malformed reply)."""

    node_id: int
    reply: TrainReply | None = None
    wire_bytes: int = 0
    error: str | None = None


@dataclass(frozen=True, eq=False)
class Roster:
    """Who may answer a train round, and where the modules the server expects come from: a simulation's partition
    (a row of class counts per client id, known before the round), or a deployment's class list and pin file, each
    site's counts arriving with its claim."""

    config_hash: str
    classes: tuple[str, ...]
    min_samples: int  # generator.min_samples: a cell with fewer images implies no module
    histogram: np.ndarray | None = None  # simulation: (clients, classes) images of the partition
    pins: Pins | None = None  # deployment: the operator's pin file, None when names are trusted

    @property
    def simulation(self) -> bool:
        return self.histogram is not None

    def cells(self, sender: int | str, counts: Mapping[int, int]) -> dict[str, int]:
        """Module id -> images, for every module a sender holding `counts` (class id -> images) should send."""
        row = np.zeros((1, len(self.classes)), dtype=np.int64)
        row[0, list(counts)] = list(counts.values())
        return implied_modules(row, [sender], self.min_samples)


@dataclass(frozen=True)
class Claim:
    """A train reply's sender, accepted: its images per class id and its test images, or the error a site sent."""

    sender: int | str  # a client id (simulation) or a site name (deployment)
    counts: dict[int, int]  # class id -> images
    test_images: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Sender:
    """A client or site whose train reply was accepted, and what the server took from it."""

    name: int | str  # the client id, or the site name
    node_id: int
    counts: dict[str, int]  # class name -> its real images (the partition's row, or the site's claim)
    cells: dict[str, int]  # module id -> images, for every module those counts imply
    modules: dict[str, bytes]  # module id -> file bytes, for every module accepted from it
    wire_bytes: int  # of its reply message
    train_seconds: float  # as it reported
    test_images: int = 0  # a site's test images, declared before any scoring

    @property
    def module_bytes(self) -> int:
        return sum(map(len, self.modules.values()))


@dataclass(frozen=True)
class TrainIntake:
    """A train round, decided (accept_train): the accepted senders in the order they answered, the replies refused
    (node and reason), the modules refused (node, sender, module id, reason), the sites that answered with their own
    error, and the release-check records accepted (module id -> record)."""

    senders: dict[int | str, Sender]
    errors: tuple[dict, ...] = ()
    rejected: tuple[dict, ...] = ()
    site_errors: dict[str, str] = field(default_factory=dict)
    release: dict[str, dict] = field(default_factory=dict)

    @property
    def accepted(self) -> dict[int | str, list[str]]:
        """Sender -> the module ids accepted from it."""
        return {k: list(s.modules) for k, s in self.senders.items()}

    @property
    def node_of(self) -> dict[int | str, int]:
        return {k: s.node_id for k, s in self.senders.items()}


@dataclass(frozen=True)
class Stale:
    module_id: str
    site: str
    reason: str
