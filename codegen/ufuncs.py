"""An elementwise SymPy expression as a sequence of NumPy ufunc calls with ``out=``.

``ArrayExpressionPrinter`` prints an expression as one NumPy expression, which
allocates a fresh array for every operation.  A statement of a layer function
called with a workspace is instead lowered here: the result goes into an array
kept in the workspace, and every intermediate is computed into that array or into
a kept scratch array of the same shape, so a training loop allocates nothing
step after step.  The operations and their order follow the expression, so the
values are those of the printed form (up to the order of additions and
multiplications of more than two terms, which SymPy keeps sorted either way).
"""

from __future__ import annotations

import re

import sympy

from codegen.printer import SIGMOID_EXPECTED_ERRORS, ArrayExpressionPrinter, stable_form
from derive.functions import flush_subnormal, logaddexp, sigmoid, softplus

# One-argument SymPy functions and their NumPy ufuncs.
UNARY = {sympy.exp: "np.exp", sympy.log: "np.log", sympy.tanh: "np.tanh", sympy.Abs: "np.abs"}


class UfuncLowering:
    """Statements computing one expression into ``target``; see :meth:`lower`.

    ``arrays`` maps the expression's array symbols to the names holding them; every
    other free symbol is a Python scalar (a size or a layer parameter).
    """

    def __init__(
        self,
        arrays: dict[sympy.Symbol, str],
        workspace: str,
        key: str,
        vectors: frozenset[str] = frozenset(),
    ):
        self.arrays = arrays
        # Names of 1-D arrays (biases): an operation between one of them and a larger
        # array goes through _k.with_vector, which gives NumPy longer loops.
        self.vectors = vectors
        self.workspace, self.key = workspace, key
        self.printer = ArrayExpressionPrinter({"fully_qualified_modules": True})
        self.lines: list[str] = []
        self.scratch: list[str] = []
        self.expected_errors: dict[str, str] = {}

    @staticmethod
    def applies(expr: sympy.Expr, arrays) -> bool:
        """Whether ``expr`` yields an array of numbers (not a truth value) from ``arrays``."""
        return bool(expr.free_symbols & set(arrays)) and not isinstance(
            expr, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational)
        )

    def lower(self, expr: sympy.Expr, target: str, reusable: tuple[str, ...] = ()) -> list[str]:
        """``target`` = a kept array of the arguments' broadcast shape and dtype, filled with ``expr``.

        ``reusable``: names of operands that nothing reads after this statement (arrays of
        the function's own, see codegen.emit): ``target`` may be the first of them that the
        statements read only in their first computation, when it has the result's shape and
        dtype at run time (_k.buffer_reusing).  Later computations write ``target`` and
        never read that operand again, so writing over it changes nothing they see.
        """
        names = sorted({self.arrays[s] for s in expr.free_symbols if s in self.arrays})
        if len(names) == 1:
            shape, dtype = f"{names[0]}.shape", f"{names[0]}.dtype"
        else:
            shape = f"_k.broadcast_shapes({', '.join(n + '.shape' for n in names)})"
            dtype = f"np.result_type({', '.join(names)})"
        self.target = target
        self.lines = [f'{target} = _k.buffer({self.workspace}, "{self.key}", {shape}, {dtype})']
        result = self.compute(expr, target)
        if result != target:  # the expression was a bare name or a scalar
            self.lines.append(f"np.copyto({target}, {result})")
        self.expected_errors.update(self.printer.expected_errors)
        for name in reusable:
            if self._read_first_only(name):
                self.lines[0] = (
                    f"{target} = _k.buffer_reusing({name}, {self.workspace}, "
                    f'"{self.key}", {shape}, {dtype})'
                )
                break
        return self.lines

    def _read_first_only(self, name: str) -> bool:
        """Whether of the computations (the lines after the target's and the scratch arrays'
        allocations) only the first mentions ``name``."""
        word = re.compile(rf"\b{re.escape(name)}\b")
        computations = [line for line in self.lines[1:] if not line.startswith(tuple(self.scratch))]
        mentions = [bool(word.search(line)) for line in computations]
        return any(mentions) and not any(mentions[1:])

    # -- helpers ------------------------------------------------------------------------

    def is_array(self, expr) -> bool:
        return bool(expr.free_symbols & set(self.arrays))

    def is_leaf(self, expr) -> bool:
        return not self.is_array(expr) or expr in self.arrays

    def scalar(self, expr) -> str:
        text = self.printer.doprint(expr)
        simple = text.isidentifier() or text.replace(".", "", 1).isdigit()
        return text if simple else f"({text})"

    def new_scratch(self) -> str:
        name = f"{self.target}_scratch{len(self.scratch) + 1}"
        self.scratch.append(name)
        self.lines.append(
            f'{name} = _k.buffer({self.workspace}, "{self.key}.scratch{len(self.scratch)}", '
            f"{self.target}.shape, {self.target}.dtype)"
        )
        return name

    def operand(self, expr, dest: str, busy: bool) -> str:
        """Code for ``expr`` as an operand: its name or scalar, else computed into ``dest``
        when ``dest`` is free (``busy`` False), else into a scratch array."""
        if not self.is_array(expr):
            return self.scalar(expr)
        if expr in self.arrays:
            return self.arrays[expr]
        return self.compute(expr, self.new_scratch() if busy else dest)

    def emit(self, call: str) -> None:
        self.lines.append(call)

    # -- the expression tree --------------------------------------------------------------

    def compute(self, expr, dest: str) -> str:
        """Emit statements that leave ``expr`` in ``dest``; return ``dest``, or the code of
        a name or scalar when ``expr`` is one (nothing emitted)."""
        if not self.is_array(expr):
            return self.scalar(expr)
        if expr in self.arrays:
            return self.arrays[expr]
        if isinstance(expr, sympy.Add):
            return self.add(expr, dest)
        if isinstance(expr, sympy.Mul):
            return self.multiply(expr, dest)
        if isinstance(expr, sympy.Pow):
            return self.power(expr, dest)
        if isinstance(expr, sigmoid):
            self.expected_errors.update(SIGMOID_EXPECTED_ERRORS)
            return self.compute(stable_form(expr), dest)
        if isinstance(expr, flush_subnormal):
            argument = self.operand(expr.args[0], dest, busy=False)
            self.emit(f"_k.flush_subnormals({argument}, out={dest})")
            return dest
        if isinstance(expr, softplus):
            return self.compute(stable_form(expr), dest)
        if isinstance(expr, logaddexp):
            first = self.operand(expr.args[0], dest, busy=False)
            second = self.operand(expr.args[1], dest, busy=first == dest)
            self.emit(f"np.logaddexp({first}, {second}, out={dest})")
            return dest
        if expr.func in UNARY:
            argument = self.operand(expr.args[0], dest, busy=False)
            self.emit(f"{UNARY[expr.func]}({argument}, out={dest})")
            return dest
        if isinstance(expr, (sympy.Max, sympy.Min)) and len(expr.args) == 2:
            ufunc = "np.maximum" if isinstance(expr, sympy.Max) else "np.minimum"
            first = self.operand(expr.args[0], dest, busy=False)
            second = self.operand(expr.args[1], dest, busy=first == dest)
            if self.is_array(expr.args[0]) and self.is_array(expr.args[1]):
                self.emit(f"{ufunc}({first}, {second}, out={dest})")
            else:  # max(0, z): NumPy's loop for a scalar operand is slow
                self.emit(f"_k.with_scalar({ufunc}, {first}, {second}, {dest})")
            return dest
        if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2 and expr.args[1] == (0, True):
            # value * [condition], as the printer writes it (see its _print_Piecewise)
            value, condition = expr.args[0]
            value_code = self.operand(value, dest, busy=False)
            self.emit(f"np.multiply({value_code}, {self.printer.doprint(condition)}, out={dest})")
            return dest
        # Anything else: NumPy's own evaluation of the printed form, copied in.
        self.emit(f"np.copyto({dest}, {self.printer.doprint(expr)})")
        return dest

    def _ordered(self, terms):
        """Array terms that need computing first (they can use ``dest``), then names."""
        return sorted(terms, key=lambda term: self.is_leaf(term))

    def fold(self, ufunc: str, accumulated: str | None, term, dest: str) -> str:
        """``ufunc(accumulated, term)`` into ``dest`` (just ``term``'s code when nothing is
        accumulated yet); ``term`` is computed first, into a scratch array if ``dest``
        already holds the accumulated value."""
        if accumulated is None:
            return self.operand(term, dest, busy=False)
        other = self.operand(term, dest, busy=accumulated == dest)
        if accumulated in self.vectors or other in self.vectors:
            self.emit(f"_k.with_vector({ufunc}, {accumulated}, {other}, {dest})")
        else:
            self.emit(f"{ufunc}({accumulated}, {other}, out={dest})")
        return dest

    def settle(self, accumulated: str, dest: str) -> str:
        if accumulated != dest:
            self.emit(f"np.copyto({dest}, {accumulated})")
        return dest

    def add(self, expr, dest: str) -> str:
        array_terms = [t for t in expr.args if self.is_array(t)]
        scalars = [t for t in expr.args if not self.is_array(t)]
        if len(array_terms) == 1 and scalars and array_terms[0].could_extract_minus_sign():
            # c - x (as in 1 - a): one subtraction instead of negating x and adding c.
            # In dest's dtype, as the negation and addition were (-x into dest is exact
            # even when dest is wider than x): the same bits.
            minuend = self.scalar(sympy.Add(*scalars))
            subtrahend = self.operand(-array_terms[0], dest, busy=False)
            self.emit(f"np.subtract({minuend}, {subtrahend}, out={dest}, dtype={dest}.dtype)")
            return dest
        terms = self._ordered(array_terms)
        if (
            len(terms) > 1
            and terms[0].could_extract_minus_sign()
            and not terms[1].could_extract_minus_sign()
        ):
            # -a + b as b - a (one pass less, the same value); only the first two swap,
            # so every later addition sees the same partial sum.
            terms[0], terms[1] = terms[1], terms[0]
        accumulated = None
        for term in terms:
            if accumulated is not None and term.could_extract_minus_sign():
                accumulated = self.fold("np.subtract", accumulated, -term, dest)
            else:
                accumulated = self.fold("np.add", accumulated, term, dest)
        if scalars:
            accumulated = self.fold("np.add", accumulated, sympy.Add(*scalars), dest)
        return self.settle(accumulated, dest)

    def multiply(self, expr, dest: str) -> str:
        numerator, denominator = [], []
        for factor in expr.args:
            if isinstance(factor, sympy.Pow) and factor.exp.is_number and factor.exp < 0:
                denominator.append(factor.base ** (-factor.exp))
            else:
                numerator.append(factor)
        scalar_numerator = sympy.Mul(*[f for f in numerator if not self.is_array(f)])
        scalar_denominator = sympy.Mul(*[f for f in denominator if not self.is_array(f)])
        accumulated = None
        for factor in self._ordered([f for f in numerator if self.is_array(f)]):
            accumulated = self.fold("np.multiply", accumulated, factor, dest)
        if scalar_numerator == -1 and accumulated is not None:
            self.emit(f"np.negative({accumulated}, out={dest})")
            accumulated = dest
        elif scalar_numerator != 1 or accumulated is None:
            accumulated = self.fold("np.multiply", accumulated, scalar_numerator, dest)
        for factor in [f for f in denominator if self.is_array(f)]:
            accumulated = self.fold("np.divide", accumulated, factor, dest)
        if scalar_denominator != 1:
            accumulated = self.fold("np.divide", accumulated, scalar_denominator, dest)
        return self.settle(accumulated, dest)

    def power(self, expr, dest: str) -> str:
        base, exponent = expr.args
        if exponent == -1:
            return self.multiply(sympy.Mul(1, expr, evaluate=False), dest)
        argument = self.operand(base, dest, busy=False)
        if exponent == 2:
            self.emit(f"np.square({argument}, out={dest})")
        elif exponent == sympy.Rational(1, 2):
            self.emit(f"np.sqrt({argument}, out={dest})")
        else:
            self.emit(f"np.power({argument}, {self.scalar(exponent)}, out={dest})")
        return dest
