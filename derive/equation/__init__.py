"""Layers from one equation: parse index notation, derive the adjoint, lower it to NumPy
primitives, and describe the result as an ordinary ``derive.layer.Layer``."""

from __future__ import annotations

import re

from derive.equation.layer import layer_from_equation
from derive.equation.syntax import EquationError

__all__ = ["EquationError", "layer_from_equation", "layer_from_named_equation", "split_name"]

_NAMED = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*:(.*)$", re.S)


def split_name(text: str, default_name: str) -> tuple[str, str]:
    """``"conv: Z[...] = ..."`` -> ("conv", "Z[...] = ..."); without a name, the default."""
    match = _NAMED.match(text)
    if match:
        return match.group(1), match.group(2)
    return default_name, text


def layer_from_named_equation(text: str, default_name: str = "equation"):
    name, equation = split_name(text, default_name)
    return layer_from_equation(name, equation)
