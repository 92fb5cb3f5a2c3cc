"""SymPy printers for the two kinds of expressions in generated code.

* ``ArrayExpressionPrinter`` prints the pointwise parts of closed forms as NumPy
  (``np.exp``, ``np.where``...), with the numerically stable forms that
  ``derive.functions.STABLE_FORMS`` proves equal to the textbook ones.
* ``IntegerPrinter`` prints sizes and conditions on sizes as plain Python.
"""

from __future__ import annotations

import sympy
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter


class ArrayExpressionPrinter(NumPyPrinter):
    """NumPy source for an elementwise expression, calling the module ``np``."""

    def _module_format(self, fqn, register=True):
        text = super()._module_format(fqn, register)
        return "np." + text[len("numpy.") :] if text.startswith("numpy.") else text

    def _print_Piecewise(self, expr):
        # SymPy's default is numpy.select(..., default=nan): a NaN wherever no condition
        # holds.  The pieces here always end in a True condition, so nested np.where is exact.
        *pieces, (last_value, last_condition) = expr.args
        if last_condition != sympy.true:
            raise ValueError(
                f"a Piecewise without a final True condition cannot be emitted: {expr}"
            )
        text = self._print(last_value)
        for value, condition in reversed(pieces):
            text = f"np.where({self._print(condition)}, {self._print(value)}, {text})"
        return text

    def _print_Relational(self, expr):
        operators = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
        return f"({self._print(expr.lhs)} {operators[expr.rel_op]} {self._print(expr.rhs)})"

    def _print_Max(self, expr):
        args = [self._print(a) for a in expr.args]
        text = args[0]
        for arg in args[1:]:
            text = f"np.maximum({text}, {arg})"
        return text

    def _print_sigmoid(self, expr):
        # Stable form (derive.functions.STABLE_FORMS): (1 + tanh(u/2)) / 2 never overflows.
        return f"(0.5 * (1.0 + np.tanh(0.5 * ({self._print(expr.args[0])}))))"

    def _print_softplus(self, expr):
        # Stable form: logaddexp(0, u) = max(u, 0) + log1p(exp(-|u|)).
        return f"np.logaddexp(0.0, {self._print(expr.args[0])})"

    def _print_Rational(self, expr):
        return f"({expr.p} / {expr.q})"

    def _print_Half(self, expr):
        return "0.5"


class IntegerPrinter(PythonCodePrinter):
    """Python source for integer size expressions and conditions on them."""

    def _print_Min(self, expr):
        return "min(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Max(self, expr):
        return "max(" + ", ".join(self._print(a) for a in expr.args) + ")"


def array_code(expr: sympy.Expr) -> str:
    return ArrayExpressionPrinter({"fully_qualified_modules": True}).doprint(expr)


def integer_code(expr) -> str:
    return IntegerPrinter().doprint(sympy.sympify(expr))
