"""Privacy accounting: the mechanisms of a private module as plain records, composed by Google's dp-accounting.

Adjacency is replace-one: two datasets are neighbours when one image is replaced by another image of the same
class. The number of images of each class is public (it is in every manifest and weights the synthesis), and with
public counts add-or-remove adjacency would promise nothing: the count itself tells the two neighbours apart.
Under replace-one a sum of per-image vectors of norm at most b moves by up to 2b, so every sensitivity below is
twice the per-image bound.

Composition uses the privacy loss distribution accountant (Koskela et al. 2020; Doroshenko et al. 2022) of
dp-accounting with its pessimistic rounding, which is tighter than Renyi DP for Gaussian releases and never
reports less than the truth. Every function here is plain float math: no torch, no data.
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from fedfactory.errors import FedFactoryError

ADJACENCY = "replace-one"
ADJACENCY_TEXT = ("replace-one: neighbouring datasets differ in one image replaced by another of the same class; "
                  "the number of images per class is public")
ACCOUNTANT = f"dp-accounting {version('dp-accounting')} PLD (pessimistic), replace-one"
KINDS = ("gaussian", "poisson-subsampled-gaussian")
# The PLD's privacy-loss grid. Pessimistic rounding makes a coarser grid report a larger epsilon, never a smaller
# one; at 1e-3 a 3,000-step DP-SGD run reads 5.7054 against 5.7043 at 1e-4, and composes ten times faster.
DISCRETIZATION = 1e-3
# The least noise multiplier calibration considers. A single replace-one Gaussian at 0.5 already spends about
# epsilon 40 at delta 1e-5, and far less noise makes the PLD's privacy-loss grid (and its memory) explode; a larger
# budget is met with this much noise, and the manifest states the smaller epsilon actually spent.
MIN_NOISE = 0.5


class PrivacyBudgetError(FedFactoryError, ValueError):
    """A privacy budget that cannot be met (or parameters that define no mechanism)."""


@dataclass(frozen=True)
class Mechanism:
    """One noisy release of a private module, with what an independent accountant needs to recompute epsilon.

    sensitivity: the largest L2 distance between the release's noiseless values on two replace-one neighbours.
    noise_std: the std of the Gaussian noise added to every coordinate of that value.
    steps: how many times it is released (DP-SGD's steps); sampling_rate: each image's Poisson inclusion
    probability per release (1.0 when every image is used).
    """

    name: str
    kind: str
    sensitivity: float
    noise_std: float
    steps: int = 1
    sampling_rate: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PrivacyBudgetError(f"mechanism {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise PrivacyBudgetError(f"mechanism {self.name}: sensitivity {self.sensitivity} must be > 0")
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise PrivacyBudgetError(f"mechanism {self.name}: noise_std {self.noise_std} must be > 0")
        if type(self.steps) is not int or self.steps < 1:
            raise PrivacyBudgetError(f"mechanism {self.name}: steps {self.steps} must be an int >= 1")
        if not 0 < self.sampling_rate <= 1 or (self.kind == "gaussian" and self.sampling_rate != 1):
            raise PrivacyBudgetError(f"mechanism {self.name}: sampling_rate {self.sampling_rate} must lie in (0, 1], "
                                     "and be 1 for a gaussian")

    @property
    def noise_multiplier(self) -> float:
        """The noise std over one image's norm bound (half the replace-one sensitivity): the number DP-SGD papers
        and dp-accounting's replace-one Gaussian, N(-1, s^2) against N(1, s^2), call the noise multiplier."""
        return self.noise_std / (self.sensitivity / 2)

    def to_dict(self) -> dict:
        return asdict(self)


MECHANISM_KEYS = frozenset(Mechanism.__dataclass_fields__)


def mechanism_from_dict(d: dict) -> Mechanism:
    """A Mechanism from a manifest's record; PrivacyBudgetError names what is wrong."""
    if not isinstance(d, dict) or d.keys() != MECHANISM_KEYS:
        raise PrivacyBudgetError(f"a mechanism must be an object with exactly {', '.join(sorted(MECHANISM_KEYS))}")
    if not isinstance(d["name"], str) or not isinstance(d["kind"], str):
        raise PrivacyBudgetError("a mechanism's name and kind must be strings")
    for key in ("sensitivity", "noise_std", "sampling_rate"):
        if type(d[key]) not in (int, float):
            raise PrivacyBudgetError(f"mechanism {d['name'][:40]}: {key} must be a number")
    return Mechanism(d["name"], d["kind"], float(d["sensitivity"]), float(d["noise_std"]), d["steps"],
                     float(d["sampling_rate"]))


def dp_event(m: Mechanism) -> dp_accounting.DpEvent:
    """The mechanism as a dp-accounting event (replace-one: its noise multiplier is over half the sensitivity)."""
    event = dp_accounting.GaussianDpEvent(m.noise_multiplier)
    if m.kind == "poisson-subsampled-gaussian":
        event = dp_accounting.PoissonSampledDpEvent(m.sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, m.steps)


def epsilon_of(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at delta of all the mechanisms composed, under replace-one adjacency (PLD accountant)."""
    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"delta={delta} must lie in (0, 1)")
    return _epsilon(tuple(mechanisms), delta)


@functools.lru_cache(maxsize=4096)  # calibration asks the same compositions again for every module of one size
def _epsilon(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                                                      value_discretization_interval=DISCRETIZATION)
    accountant.compose(dp_accounting.ComposedDpEvent([dp_event(m) for m in mechanisms]))
    return max(0.0, float(accountant.get_epsilon(delta)))


def calibrate(mechanisms_at: Callable[[float], list[Mechanism]], epsilon: float, delta: float,
              max_noise: float = 1e3, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier s (to a relative tolerance, rounded up) whose mechanisms_at(s) compose to at
    most epsilon at delta. Epsilon falls monotonically as the noise grows, so a bisection on log s finds it.

    Raises PrivacyBudgetError when even max_noise does not meet the budget.
    """
    def spent(s: float) -> float:
        return epsilon_of(mechanisms_at(s), delta)

    if spent(max_noise) > epsilon:
        raise PrivacyBudgetError(f"epsilon={epsilon} at delta={delta} cannot be met even with noise multiplier "
                                 f"{max_noise:g}")
    low, high = MIN_NOISE, max_noise
    if spent(low) <= epsilon:
        return low
    while high / low > 1 + tolerance:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high


def guarantee_problem(privacy: dict | None, epsilon: float, delta: float) -> str | None:
    """Why a module's privacy block does not give the (epsilon, delta) a run asks for, or None if it does.

    The stated epsilon is not taken on trust: it is recomputed here from the listed mechanisms, so a manifest
    cannot vouch for itself.
    """
    if not privacy:
        return f"it carries no privacy guarantee; the run asks ({epsilon:g}, {delta:g})-DP"
    if privacy.get("adjacency") != ADJACENCY:
        return f"its guarantee is stated for adjacency {str(privacy.get('adjacency'))[:40]!r}, not {ADJACENCY}"
    stated_delta = privacy.get("delta")
    if type(stated_delta) is not float or not 0 < stated_delta <= delta:
        return f"its delta {stated_delta!r} is above the run's privacy.delta={delta:g}"
    try:
        mechanisms = [mechanism_from_dict(d) for d in privacy.get("mechanisms", [])]
    except PrivacyBudgetError as e:
        return f"its privacy block lists a mechanism that defines no guarantee ({e})"
    if not mechanisms:
        return "its privacy block lists no mechanism"
    spent = epsilon_of(mechanisms, stated_delta)
    stated = privacy.get("epsilon")
    # A small slack for float rounding only: the accountant itself rounds pessimistically.
    if type(stated) not in (int, float) or stated < spent * (1 - 1e-6):
        return f"it states epsilon {stated!r}, but its mechanisms compose to {spent:.4f} (recomputed)"
    if stated > epsilon * (1 + 1e-6):
        return f"it states epsilon {stated:g}, above the run's privacy.epsilon={epsilon:g}"
    if spent > epsilon * (1 + 1e-6):
        return (f"its mechanisms compose to epsilon {spent:.4f} at delta {stated_delta:g} (recomputed), above the "
                f"run's privacy.epsilon={epsilon:g}")
    return None
