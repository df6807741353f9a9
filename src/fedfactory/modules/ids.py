"""Module ids and file names: "client-003_class-007" in a simulation, "hospital-a_class-007" in a deployment.

The one place the id format is written; everything that builds, checks or splits an id calls this file.
"""

import re
from collections.abc import Sequence

from fedfactory.data.partition import implied_cells
from fedfactory.modules.refusal import is_int, show

# [0-9] rather than \d: \d also matches non-ASCII digits, which would smuggle odd names into paths.
# A deployment's module ids carry the site name instead of a partition index: "hospital-a_class-002".
_SITE_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")
_MODULE_ID_RE = re.compile(r"(?:client-[0-9]{3,6}|(?!client-[0-9]+_)[a-z][a-z0-9-]{0,39})_class-[0-9]{3,6}")
_CLASS_SEPARATOR = "_class-"  # no client name holds "_", so an id splits at its only one
_MAX_ID = 999_999  # the widest id the six-digit module id pattern can hold


def is_site_name(name: object) -> bool:
    """A deployment site's name: lowercase letters, digits and dashes, up to 40, not of the simulation's form."""
    return isinstance(name, str) and bool(_SITE_RE.fullmatch(name)) and not re.fullmatch(r"client-[0-9]+", name)


def client_name(client_id: int | str) -> str:
    """The client part of a module id: a partition index as "client-003", a deployment's site name as itself."""
    return client_id if isinstance(client_id, str) else f"client-{client_id:03d}"


def _join(client_id: int | str, class_id: int) -> str:
    return f"{client_name(client_id)}{_CLASS_SEPARATOR}{class_id:03d}"


def module_id(client_id: int | str, class_id: int) -> str:
    """Module id for a client (a partition index, or a deployment's site name) and class, e.g.
    "client-003_class-007" or "hospital-a_class-007"."""
    if isinstance(client_id, str) and not is_site_name(client_id):
        raise ValueError(f"site name {show(client_id)} must be 1 to 40 lowercase letters, digits and dashes, "
                         "starting with a letter (e.g. hospital-a), and not client-<number>")
    for label, value in (("client_id", client_id), ("class_id", class_id)):
        if isinstance(value, str) and label == "client_id":
            continue
        if not is_int(value) or not 0 <= value <= _MAX_ID:
            raise ValueError(f"{label} must be an int in [0, {_MAX_ID}], got {show(value)}")
    return _join(client_id, class_id)


def is_module_id(mid: object) -> bool:
    """Whether `mid` has the form of a module id (and so is safe inside a path)."""
    return isinstance(mid, str) and bool(_MODULE_ID_RE.fullmatch(mid))


def is_id_of(mid: str, client_id: int | str, class_id: int) -> bool:
    """Whether `mid` is exactly the id of (client_id, class_id). No range check: an untrusted manifest's id past
    six digits is then a mismatch to refuse, not an error of module_id()."""
    return mid == _join(client_id, class_id)


def client_of(mid: str) -> str:
    """The client part of a module id, "client-003" or "hospital-a": what precedes its "_class-" ("" if none)."""
    return mid.rpartition(_CLASS_SEPARATOR)[0]


def module_filename(mid: str) -> str:
    """File name of a module; refuses anything that is not a module id, so no path can be smuggled in."""
    if not is_module_id(mid):
        raise ValueError(f"module id must look like 'client-003_class-007' or 'hospital-a_class-007', got {show(mid)}")
    return mid + ".safetensors"


def implied_modules(histogram, clients: Sequence[int | str], min_samples: int = 1) -> dict[str, int]:
    """Module id -> real images, for every module a class histogram implies (data.partition.implied_cells), row k
    being clients[k]: a partition index, or a deployment's site name. The one list the runner, the Flower server,
    unlearning and the report expect."""
    return {module_id(clients[k], c): n for (k, c), n in implied_cells(histogram, min_samples).items()}
