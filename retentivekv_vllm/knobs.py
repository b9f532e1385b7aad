"""What every setting of the plugin is made of: a knob (a dataclass field with its help and its
kind), how a raw value becomes one (`coerce`), and the errors that name it.

A leaf module: the common settings (``config.py``) and each policy's own settings dataclass (next
to the policy, e.g. ``policies/retentive.py``) are built from it, so that the policies need not
import the settings that hold them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

KEY_PREFIX = "kv_"
# Numbers beyond 2**53 are not exact in a float, and no knob means anything there; the largest
# token budget any model could use is its maximum length (checked where that is known).
LARGEST_NUMBER = 2**53
SHOWN_CHARACTERS = 40  # of a refused value, in an error message


def shown(value: Any) -> str:
    """A refused value as an error message shows it: its repr, cut to SHOWN_CHARACTERS."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


class ConfigError(ValueError):
    """A bad KV-policy setting; the message names the option."""


def option(name: str) -> str:
    """How an error names knob `name`: its flag and its additional_config key."""
    return f"--kv-{name.replace('_', '-')} (additional_config.{KEY_PREFIX}{name})"


class KnobError(ConfigError):
    """A bad value of one knob, named by its command-line spelling."""

    def __init__(self, knob: str, why: str) -> None:
        super().__init__(f"{option(knob)}: {why}")
        self.knob, self.why = knob, why


def knob(default: Any, help: str, kind: type) -> Any:
    """A dataclass field that is a knob: `kind` (int, float, str, or Path for a file path) says
    how `coerce` reads a raw value, `help` is its line in ``vllm serve --help``."""
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind})


def knob_name(f: dataclasses.Field) -> str:
    """The knob's name in flags, keys and errors (``lambda_`` is ``lambda``)."""
    return f.name.rstrip("_")


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A raw value (a flag's string, a JSON value) as knob `f` holds it, or KnobError."""
    kind, name = f.metadata["kind"], knob_name(f)
    if kind is Path:  # kept as written: a path is case-sensitive
        if not isinstance(value, str | os.PathLike):
            raise KnobError(name, f"expected a file path, got {value!r}")
        return str(value).strip()
    if kind is str:
        if not isinstance(value, str):
            raise KnobError(name, f"expected a string, got {shown(value)}")
        return value.strip().lower()
    # bool is an int to Python, not a number to a user; lists, None and objects are no numbers.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KnobError(name, f"expected a number, got {shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise KnobError(name, f"expected a number, got {shown(value)}") from None
    if not math.isfinite(number) or abs(number) > LARGEST_NUMBER:
        raise KnobError(name, f"must be a finite number of at most 2**53, got {shown(value)}")
    if kind is int:
        if number != int(number):
            raise KnobError(name, f"expected an integer, got {shown(value)}")
        return int(number)
    return number


def check_choice(name: str, value: str, choices, what: str = "mode") -> None:
    """KnobError unless `value` is one of `choices` (listed in the order given)."""
    if value not in choices:
        raise KnobError(name, f"unknown {what} {shown(value)}; choose one of {list(choices)}")
