"""Sparse polynomials for the seed-size proof.

At the seed network's size (28x28 input, 9x9x1x20 kernels) a convolution has
648,000 products per pass; building each as a SymPy ``Mul`` makes the proof take
minutes.  Convolution and dense layers are polynomials (linear in each operand),
so there a polynomial can be held as a table {monomial: coefficient}, where a
monomial is the sorted tuple of its variables (SymPy symbols, by number):

* sums and products are table operations;
* the derivative by a variable is coefficient extraction: every monomial that
  contains the variable, with one factor of it removed;
* two polynomials are equal exactly when their tables are equal.

``Polynomial.as_expr()`` turns a table back into a SymPy expression, for messages.
The symbolic interpreter runs unchanged on these values: they support ``+``, ``-``,
``*`` and comparison with 0, which is all the linear primitives use.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterable

import sympy

_symbols: list[sympy.Symbol] = []
_numbers: dict[sympy.Symbol, int] = {}


def _number(symbol: sympy.Symbol) -> int:
    if symbol not in _numbers:
        _numbers[symbol] = len(_symbols)
        _symbols.append(symbol)
    return _numbers[symbol]


def _scalar(value):
    """A rational constant as a Python number, or None if ``value`` is not one."""
    if isinstance(value, (int, Fraction)):
        return value
    if isinstance(value, sympy.Basic) and value.is_Rational:
        return int(value) if value.is_Integer else Fraction(int(value.p), int(value.q))
    return None


class Polynomial:
    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[int, ...], object] | None = None):
        self.terms = terms or {}

    @classmethod
    def variable(cls, symbol: sympy.Symbol) -> "Polynomial":
        return cls({(_number(symbol),): 1})

    @classmethod
    def total(cls, items: Iterable) -> "Polynomial":
        out: dict = {}
        for item in items:
            if isinstance(item, Polynomial):
                for monomial, coefficient in item.terms.items():
                    out[monomial] = out.get(monomial, 0) + coefficient
            else:
                constant = _scalar(item)
                if constant is None:
                    raise TypeError(f"cannot add {item!r} to a polynomial")
                if constant:
                    out[()] = out.get((), 0) + constant
        return cls({m: c for m, c in out.items() if c != 0})

    def __add__(self, other):
        return Polynomial.total((self, other))

    __radd__ = __add__

    def __neg__(self):
        return Polynomial({m: -c for m, c in self.terms.items()})

    def __sub__(self, other):
        return self + (-other if isinstance(other, Polynomial) else -_scalar(other))

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        constant = None if isinstance(other, Polynomial) else _scalar(other)
        if constant is not None:
            if constant == 0:
                return Polynomial()
            return Polynomial({m: c * constant for m, c in self.terms.items()})
        if not isinstance(other, Polynomial):
            raise TypeError(f"cannot multiply a polynomial by {other!r}")
        if len(self.terms) == 1 and len(other.terms) == 1:  # the common case: two monomials
            ((m1, c1),) = self.terms.items()
            ((m2, c2),) = other.terms.items()
            return Polynomial({tuple(sorted(m1 + m2)): c1 * c2})
        out: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                monomial = tuple(sorted(m1 + m2))
                out[monomial] = out.get(monomial, 0) + c1 * c2
        return Polynomial({m: c for m, c in out.items() if c != 0})

    __rmul__ = __mul__

    def __eq__(self, other):
        if isinstance(other, Polynomial):
            return self.terms == other.terms
        constant = _scalar(other)
        if constant is None:
            return NotImplemented
        return self.terms == ({(): constant} if constant else {})

    def __hash__(self):
        return hash(frozenset(self.terms.items()))

    def partials(self) -> dict[int, "Polynomial"]:
        """Every nonzero first derivative, {variable number: derivative}, in one pass
        over the table (coefficient extraction for all variables at once)."""
        tables: dict[int, dict] = {}
        for monomial, coefficient in self.terms.items():
            for position, number in enumerate(monomial):
                if position and monomial[position - 1] == number:
                    continue  # a repeated factor: its power is counted below
                power = monomial.count(number)
                rest = monomial[:position] + monomial[position + 1 :]
                table = tables.setdefault(number, {})
                table[rest] = table.get(rest, 0) + coefficient * power
        return {number: Polynomial(table) for number, table in tables.items()}

    def variables(self) -> set[int]:
        return {number for monomial in self.terms for number in monomial}

    def as_expr(self) -> sympy.Expr:
        return sympy.Add(
            *[
                sympy.Rational(c.numerator, c.denominator) * sympy.Mul(*[_symbols[k] for k in m])
                if isinstance(c, Fraction)
                else c * sympy.Mul(*[_symbols[k] for k in m])
                for m, c in self.terms.items()
            ]
        )

    def __repr__(self):
        return f"Polynomial({self.as_expr()})"
