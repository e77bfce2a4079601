"""Declared plugin options: types, defaults and validation before any model is loaded.

Strategies and evaluators declare their options so that the CLI and study files can check a
configuration up front: a typo in a sweep should fail in a second, not after an hour of work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prunelab.errors import PrunelabError


def at_least(low: int) -> Callable[[Any], str | None]:
    """An ``Option.check`` for an integer option with a lower bound (steps, batch, rank, ...)."""
    return lambda value: None if value >= low else f"must be >= {low}, got {value}"


@dataclass(frozen=True)
class Option:
    """One named option of a plugin."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    # Returns an error message for a bad value (already converted to ``type``), or None.
    check: Callable[[Any], str | None] | None = None
    required: bool = False

    def convert(self, value: Any, owner: str) -> Any:
        """Convert a CLI string or study-file value to the declared type, or raise a clear error."""
        if value is None:
            return None
        try:
            converted = _convert(value, self.type)
        except (TypeError, ValueError):
            raise PrunelabError(
                f"{owner}: option '{self.name}' expects {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and converted not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise PrunelabError(f"{owner}: option '{self.name}' must be one of {allowed}, got {value!r}")
        if self.check is not None and (problem := self.check(converted)):
            raise PrunelabError(f"{owner}: option '{self.name}': {problem}")
        return converted


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ValueError(value)
    if kind is float and isinstance(value, bool) or kind is int and isinstance(value, bool):
        raise TypeError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is int and isinstance(value, str):
        return int(value, 10)
    return kind(value)


@dataclass(frozen=True)
class OptionSet:
    """The options of one plugin; validates a whole mapping at once."""

    owner: str
    options: tuple[Option, ...] = field(default_factory=tuple)

    def validate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Return every option with defaults filled in; unknown names and bad values are errors."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise PrunelabError(f"{self.owner}: unknown option(s) {', '.join(unknown)} (known: {names})")
        result: dict[str, Any] = {}
        for name, option in known.items():
            if name in values and values[name] is not None:
                result[name] = option.convert(values[name], self.owner)
            elif option.required:
                raise PrunelabError(f"{self.owner}: option '{name}' is required")
            else:
                result[name] = option.default
        return result
