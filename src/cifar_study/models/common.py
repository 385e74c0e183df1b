"""Building blocks and argument checks shared by the models."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def check_activation(name: object) -> None:
    """Raise ValueError unless `name` is a key of ACTIVATIONS."""
    if name not in ACTIVATIONS:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"activation={name!r} is not supported. Use one of {valid}")


def make_activation(name: str) -> nn.Module:
    """Build the activation module called `name` (relu, tanh, sigmoid or gelu)."""
    check_activation(name)
    return ACTIVATIONS[name]()


def check_positive_int(option: str, value: object) -> None:
    """Raise ValueError unless `value` is an integer of at least 1."""
    # bool is a subclass of int, but True as a size is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{option}={value!r} is invalid. Use an integer of at least 1")


def check_dropout(value: object) -> None:
    """Raise ValueError unless `value` is a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise ValueError(f"dropout={value!r} is invalid. Use a probability in [0, 1)")


def check_int_sequence(option: str, values: object) -> tuple[int, ...]:
    """Return `values` as a tuple after checking that it is a non-empty sequence of positive integers."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(
            f"{option}={values!r} is invalid. Use a non-empty list of integers of at least 1"
        )
    items = tuple(values)
    if not items:
        raise ValueError(
            f"{option}={values!r} is empty. Use a non-empty list of integers of at least 1"
        )
    for index, value in enumerate(items):
        check_positive_int(f"{option}[{index}]", value)
    return items
