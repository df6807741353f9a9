"""How a module is refused: ModuleError, with one-line messages that quote untrusted values safely."""

from fedfactory.errors import FedFactoryError

RESAVE = "re-save the module with fedfactory.modules.files.save_module"
NOT_A_MODULE = "send the .safetensors file written by save_module"


class ModuleError(FedFactoryError, ValueError):
    """A module file or payload was refused; the message names the file and the rule it broke."""


def refuse(source: str, rule: str, fix: str = RESAVE) -> ModuleError:
    return ModuleError(f"{source}: {rule}; {fix}")


def show(value: object, limit: int = 60) -> str:
    """Short repr of an untrusted value that cannot break a one-line message or take long to build."""
    if isinstance(value, str):
        text = repr(value[:limit])
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    else:
        # Containers parsed from a hostile header can be huge or deeply nested; name the type only.
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is never a valid count or id.
    return type(value) is int
