"""SymPy printers for the two kinds of expressions in generated code.

* ``ArrayExpressionPrinter`` prints the pointwise parts of closed forms as NumPy
  (``np.exp``, ``np.where``...), with the numerically stable forms that
  ``derive.functions.STABLE_FORMS`` proves equal to the textbook ones.
* ``IntegerPrinter`` prints sizes and conditions on sizes as plain Python.
"""

from __future__ import annotations

import sympy
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from derive.functions import STABLE_FORM_SYMBOL, STABLE_FORMS

# The floating-point errors that sigmoid's form raises by design, and why they are harmless.
_SIGMOID_REASON = (
    "sigmoid: exp(-x) overflowing to inf or underflowing to 0 gives its limits 0 and 1"
)
SIGMOID_EXPECTED_ERRORS = {"over": _SIGMOID_REASON, "under": _SIGMOID_REASON}


def stable_form(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` (a call of a named function of derive.functions, such as sigmoid(x)) in the
    stable form that derive.functions.STABLE_FORMS states and derive.verify proves: what
    is emitted is read from there, not written again here."""
    return STABLE_FORMS[type(expr).__name__][1].xreplace({STABLE_FORM_SYMBOL: expr.args[0]})


class ArrayExpressionPrinter(NumPyPrinter):
    """NumPy source for an elementwise expression, calling the module ``np``.

    ``expected_errors`` collects the floating-point errors (NumPy errstate names) that
    the printed code raises by design, with the reason: the statement that evaluates
    it runs with those errors ignored.
    """

    def __init__(self, settings=None):
        super().__init__(settings)
        self.expected_errors: dict[str, str] = {}

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
        if len(pieces) == 1 and last_value == 0:
            # value * [condition]: a multiplication by the boolean mask, about 15 times
            # faster than np.where(condition, value, 0) in NumPy 2.x.  The two agree
            # wherever value is finite, except that a negative value where the condition
            # fails gives -0.0 (equal to 0); a NaN or inf value there gives NaN instead of 0
            # (a gradient that is already NaN or inf upstream).
            value, condition = pieces[0]
            return f"({self._print(value)} * {self._print(condition)})"
        text = self._print(last_value)
        for value, condition in reversed(pieces):
            text = f"np.where({self._print(condition)}, {self._print(value)}, {text})"
        return text

    def _print_Relational(self, expr):
        operators = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
        return f"({self._print(expr.lhs)} {operators[expr.rel_op]} {self._print(expr.rhs)})"

    def _print_Max(self, expr):
        return self._fold("np.maximum", expr.args)

    def _print_Min(self, expr):
        # SymPy's own printer writes functools.reduce(np.minimum, ...), which needs an
        # import the generated modules do not have.
        return self._fold("np.minimum", expr.args)

    def _fold(self, function: str, args) -> str:
        text = self._print(args[0])
        for arg in args[1:]:
            text = f"{function}({text}, {self._print(arg)})"
        return text

    def _print_sigmoid(self, expr):
        self.expected_errors.update(SIGMOID_EXPECTED_ERRORS)
        return f"({self._print(stable_form(expr))})"

    def _print_flush_subnormal(self, expr):
        # derive.functions.flush_subnormal: subnormal values become 0 (see the kernel).
        return f"_k.flush_subnormals({self._print(expr.args[0])})"

    def _print_softplus(self, expr):
        return self._print(stable_form(expr))

    def _print_logaddexp(self, expr):
        return f"np.logaddexp({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_Pow(self, expr, rational=False):
        # 1 / x rather than SymPy's x ** (-1.0): np.power is several times slower.
        if expr.exp == -1:
            return f"(1 / {self.parenthesize(expr.base, PRECEDENCE['Pow'])})"
        return super()._print_Pow(expr, rational=rational)

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

    def _print_floor(self, expr):
        # Integer division, exact for any size (math.floor of a float division is not).
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if denominator == 1:
            return self._print(numerator)
        return (
            f"(({self._print(numerator)}) // {self.parenthesize(denominator, PRECEDENCE['Mul'])})"
        )


def array_code(expr: sympy.Expr, expected_errors: dict[str, str] | None = None) -> str:
    """NumPy source for ``expr``; the errors it raises by design are added to ``expected_errors``."""
    printer = ArrayExpressionPrinter({"fully_qualified_modules": True})
    text = printer.doprint(expr)
    if expected_errors is not None:
        expected_errors.update(printer.expected_errors)
    return text


def integer_code(expr) -> str:
    return IntegerPrinter().doprint(sympy.sympify(expr))
