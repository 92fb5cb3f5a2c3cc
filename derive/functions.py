"""Named scalar functions whose textbook form overflows in floating point.

``sigmoid(z) = 1 / (1 + exp(-z))`` and ``softplus(z) = log(1 + exp(z))`` are kept as
named SymPy functions in the closed forms, so the printer can emit a stable
NumPy form for each.  The stable form of each is stated here and proven equal
to the textbook form by ``derive.verify`` (``STABLE_FORMS``).
"""

from __future__ import annotations

import sympy


class sigmoid(sympy.Function):
    """The logistic function ``1 / (1 + exp(-z))``."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return 1 / (1 + sympy.exp(-z))

    def _latex(self, printer, exp=None):
        text = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class softplus(sympy.Function):
    """``log(1 + exp(z))``."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return sympy.log(1 + sympy.exp(z))

    def _eval_rewrite_as_log(self, z, **kwargs):
        return sympy.log(1 + sympy.exp(z))

    def _latex(self, printer, exp=None):
        text = r"\operatorname{softplus}\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class logaddexp(sympy.Function):
    """``log(exp(a) + exp(b))``, named because NumPy evaluates it without overflow
    (``np.logaddexp`` computes ``max(a, b) + log1p(exp(-|a - b|)))``)."""

    def _eval_rewrite_as_exp(self, a, b, **kwargs):
        return sympy.log(sympy.exp(a) + sympy.exp(b))

    def _eval_rewrite_as_log(self, a, b, **kwargs):
        return sympy.log(sympy.exp(a) + sympy.exp(b))


class flush_subnormal(sympy.Function):
    """``x`` itself, in exact arithmetic; in floating point, ``x`` with its subnormal values set to 0.

    A float whose magnitude is below the smallest normal number of its type
    (``numpy.finfo(dtype).tiny``: 1.2e-38 in float32) is subnormal. On many x86 CPUs
    every arithmetic operation on one goes through microcode and is tens of times slower,
    and a gradient that holds thousands of them slows the convolution that reads it
    (measured on an Intel Xeon: one ``correlate_weights`` call 15-18 ms instead of 6).
    The closed forms that produce such values (sigmoid's saturated tail, and a product
    of small factors in its gradient) are wrapped in this function. The proof works in
    exact arithmetic, where no value is subnormal and this function is the identity
    (``derive.symbolic`` drops it); the generated code replaces each subnormal by 0,
    an absolute change smaller than ``tiny``, which is what rounding near zero already
    does to any product (``_kernels.flush_subnormals``; its tests check that normal
    values and zeros pass unchanged and every subnormal becomes 0).
    """

    @classmethod
    def eval(cls, x):
        if x.is_Number:  # a constant is no array: nothing to flush
            return x
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(1)

    def _latex(self, printer, exp=None):
        text = r"\operatorname{flush}\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


def without_flushes(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` in exact arithmetic: every ``flush_subnormal(x)`` replaced by ``x``."""
    return expr.replace(flush_subnormal, lambda x: x)


_u = sympy.Symbol("u", real=True)

# name -> (textbook form, stable form), both in terms of _u.  The NumPy printer and the
# ufunc lowering emit the stable form itself, read from here (codegen.printer.stable_form).
# sigmoid: the textbook form is already stable in IEEE arithmetic.  exp(-u) overflows to
# inf for u < -88 (float32) and underflows to 0 for u > 104, and 1 / (1 + inf) = 0 and
# 1 / (1 + 0) = 1 are sigmoid's limits, so the generated code ignores those two errors for
# that statement.  There is no cancellation, so small values keep their relative accuracy
# (sigmoid(-20) = 2.1e-9 to float precision, where (1 + tanh(u/2)) / 2 gives 0), and one
# exp is about twice as fast as NumPy's float32 tanh.
# softplus: logaddexp(0, u), which NumPy evaluates as max(u, 0) + log1p(exp(-|u|)); that
# evaluation is the third entry, proven equal too.
STABLE_FORMS = {
    "sigmoid": (1 / (1 + sympy.exp(-_u)), 1 / (1 + sympy.exp(-_u))),
    "softplus": (sympy.log(1 + sympy.exp(_u)), logaddexp(0, _u)),
    "logaddexp(0, u)": (
        logaddexp(0, _u),
        sympy.log(1 + sympy.exp(-sympy.Abs(_u))) + sympy.Max(_u, 0),
    ),
}
STABLE_FORM_SYMBOL = _u
