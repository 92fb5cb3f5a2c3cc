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


_u = sympy.Symbol("u", real=True)

# name -> (textbook form, stable form that the NumPy printer emits), both in terms of _u.
# sigmoid: tanh never overflows (exp(-u) does for u < -88 in float32).  Its error is absolute,
# about one unit in the last place of 1, so sigmoid values far below float eps round to 0; the
# losses never take the log of a sigmoid (they use softplus), so nothing downstream needs them.
# softplus: NumPy's logaddexp(0, u) evaluates max(u, 0) + log1p(exp(-|u|)).
STABLE_FORMS = {
    "sigmoid": (1 / (1 + sympy.exp(-_u)), (1 + sympy.tanh(_u / 2)) / 2),
    "softplus": (
        sympy.log(1 + sympy.exp(_u)),
        sympy.log(1 + sympy.exp(-sympy.Abs(_u))) + sympy.Max(_u, 0),
    ),
}
STABLE_FORM_SYMBOL = _u
