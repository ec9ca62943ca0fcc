"""The checks every setting gets, whatever its range: type, choice, a finite number.

The dataclasses in hyperparameters.py call these from __post_init__, beside their own range
rules, so a bad value from the command line, a checkpoint or a test fails the same way.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal


def field_problems(config: Any) -> list[str]:
    """Problems any setting can have, whatever its range.

    A value of the wrong type (a checkpoint can hold anything), a choice not on offer, a float
    that is nan or infinite (it would pass every range check).
    """
    problems: list[str] = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(typing.get_args(hint))
                problems.append(f"{f.name} must be one of {choices}, got {value!r:.40}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # 3 serves as 3.0
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            problems.append(f"{f.name} must be {hint.__name__}, got {value!r:.40}")
        elif hint is float and not math.isfinite(value):
            problems.append(f"{f.name} must be a finite number, got {value}")
    return problems


def raise_if_any(problems: list[str]) -> None:
    """Report every validation problem at once, as one line."""
    if problems:
        raise ValueError("; ".join(problems))
