"""The translators are checked: the NumPy code emitted for a proven expression means it.

The printer (codegen.printer) and the ufunc lowering (codegen.ufuncs) rewrite the proven
SymPy expressions as they emit them: ``c - x`` as one subtraction, ``-a + b`` as
``b - a``, divisions folded, softplus as ``logaddexp``, sigmoid in its stable form,
``value * [condition]`` for a two-piece Piecewise.  Each emitted piece of code is read
back here into a SymPy expression, by running it with a stand-in for NumPy whose
functions build expressions instead of arrays, and compared with the proven expression:
symbolically where SymPy shows the difference is zero, numerically (at random points, to
30 digits) otherwise.  The emitter calls this for every statement, so ``generate``
refuses a translation that differs.
"""

from __future__ import annotations

import contextlib
import random

import sympy

from derive.functions import flush_subnormal


class TranslationError(RuntimeError):
    """Emitted code computes something other than the proven expression."""


class _Symbolic:
    """An array in the emitted code, read as the SymPy expression of its elements."""

    shape = "shape"  # passed along to buffer(), broadcast_shapes() and result_type()
    dtype = "dtype"

    def __init__(self, expr):
        self.expr = sympy.sympify(expr)

    # arithmetic -------------------------------------------------------------------
    def __add__(self, other):
        return _Symbolic(self.expr + _expr(other))

    def __radd__(self, other):
        return _Symbolic(_expr(other) + self.expr)

    def __sub__(self, other):
        return _Symbolic(self.expr - _expr(other))

    def __rsub__(self, other):
        return _Symbolic(_expr(other) - self.expr)

    def __mul__(self, other):
        return _multiply(self, other)

    def __rmul__(self, other):
        return _multiply(other, self)

    def __truediv__(self, other):
        return _Symbolic(self.expr / _expr(other))

    def __rtruediv__(self, other):
        return _Symbolic(_expr(other) / self.expr)

    def __pow__(self, other):
        return _Symbolic(self.expr ** _expr(other))

    def __rpow__(self, other):
        return _Symbolic(_expr(other) ** self.expr)

    def __neg__(self):
        return _Symbolic(-self.expr)

    def __abs__(self):  # the printer writes Abs as Python's abs()
        return _Symbolic(sympy.Abs(self.expr))

    def __pos__(self):
        return self

    # comparisons give masks -------------------------------------------------------
    def __gt__(self, other):
        return _Symbolic(sympy.StrictGreaterThan(self.expr, _expr(other)))

    def __ge__(self, other):
        return _Symbolic(sympy.GreaterThan(self.expr, _expr(other)))

    def __lt__(self, other):
        return _Symbolic(sympy.StrictLessThan(self.expr, _expr(other)))

    def __le__(self, other):
        return _Symbolic(sympy.LessThan(self.expr, _expr(other)))

    def sum(self, *args, **kwargs):
        raise TranslationError("a reduction inside an elementwise expression")


def _expr(value):
    if isinstance(value, _Symbolic):
        return value.expr
    if isinstance(value, float):
        # The printer writes a rational constant p/q as ``(p / q)``, which Python rounds to
        # a float: read back as the nearest fraction with a small denominator, it is p/q.
        return sympy.Rational(value).limit_denominator(10**6)
    return sympy.sympify(value)


def _is_mask(expr) -> bool:
    """A truth value: a comparison or a combination of them (a Symbol is a SymPy Boolean
    too, hence the narrower test)."""
    boolalg = sympy.logic.boolalg
    return isinstance(
        expr, (sympy.core.relational.Relational, boolalg.BooleanFunction, boolalg.BooleanAtom)
    )


def _multiply(left, right) -> _Symbolic:
    """A product; a mask (a comparison) as a factor is 1 where it holds and 0 elsewhere."""
    a, b = _expr(left), _expr(right)
    if _is_mask(a) and _is_mask(b):
        return _Symbolic(sympy.Piecewise((1, sympy.And(a, b)), (0, True)))
    if _is_mask(b):
        return _Symbolic(sympy.Piecewise((a, b), (0, True)))
    if _is_mask(a):
        return _Symbolic(sympy.Piecewise((b, a), (0, True)))
    return _Symbolic(a * b)


def _ufunc(combine):
    """A NumPy ufunc over symbolic arrays: its value, also stored in ``out`` if given."""

    def call(*args, out=None, dtype=None, **ignored):
        value = _Symbolic(combine(*[_expr(arg) for arg in args]))
        if out is not None:
            out.expr = value.expr
            return out
        return value

    return call


def _where(condition, yes, no):
    return _Symbolic(sympy.Piecewise((_expr(yes), _expr(condition)), (_expr(no), True)))


def _copyto(destination, source, **ignored):
    destination.expr = _expr(source)


def _masked_multiply(a, b, out=None, **ignored):
    value = _multiply(a, b)
    if out is not None:
        out.expr = value.expr
        return out
    return value


class _NumPy:
    """The part of NumPy that emitted elementwise code uses, building expressions."""

    exp = staticmethod(_ufunc(sympy.exp))
    log = staticmethod(_ufunc(sympy.log))
    tanh = staticmethod(_ufunc(sympy.tanh))
    abs = staticmethod(_ufunc(sympy.Abs))
    sign = staticmethod(_ufunc(sympy.sign))
    sqrt = staticmethod(_ufunc(sympy.sqrt))
    square = staticmethod(_ufunc(lambda a: a**2))
    negative = staticmethod(_ufunc(lambda a: -a))
    add = staticmethod(_ufunc(lambda a, b: a + b))
    subtract = staticmethod(_ufunc(lambda a, b: a - b))
    multiply = staticmethod(_masked_multiply)
    divide = staticmethod(_ufunc(lambda a, b: a / b))
    power = staticmethod(_ufunc(lambda a, b: a**b))
    maximum = staticmethod(_ufunc(lambda a, b: sympy.Max(a, b)))
    minimum = staticmethod(_ufunc(lambda a, b: sympy.Min(a, b)))
    # NumPy's logaddexp is log(exp(a) + exp(b)), evaluated without overflow.
    logaddexp = staticmethod(_ufunc(lambda a, b: sympy.log(sympy.exp(a) + sympy.exp(b))))
    where = staticmethod(_where)
    copyto = staticmethod(_copyto)

    @staticmethod
    def errstate(**ignored):
        return contextlib.nullcontext()

    @staticmethod
    def broadcast_shapes(*shapes):
        return "shape"

    @staticmethod
    def result_type(*arrays):
        return "dtype"


class _Kernels:
    """The runtime library's helpers that emitted elementwise code calls.  with_vector and
    with_scalar are checked against the plain ufunc call by codegen.conformance."""

    @staticmethod
    def buffer(workspace, key, shape, dtype):
        return _Symbolic(sympy.nan)  # contents undefined until written

    # buffer_reusing returns its array (which later writes then change) or a new buffer,
    # by the shapes at run time: statements that use it are read back both ways.
    reusing = True

    @classmethod
    def buffer_reusing(cls, array, workspace, key, shape, dtype):
        return array if cls.reusing else cls.buffer(workspace, key, shape, dtype)

    @staticmethod
    def broadcast_shapes(*shapes):
        return "shape"

    @staticmethod
    def with_vector(ufunc, x, y, out):
        return ufunc(x, y, out=out)

    @staticmethod
    def with_scalar(ufunc, x, y, out):
        return ufunc(x, y, out=out)

    # derive.functions.flush_subnormal, read back as itself; the kernel is checked
    # against that function's meaning by codegen.conformance.
    flush_subnormals = staticmethod(_ufunc(flush_subnormal))


def _namespace(expr: sympy.Expr) -> dict:
    names = {"np": _NumPy, "_k": _Kernels, "workspace": None}
    for symbol in expr.free_symbols:
        names[symbol.name] = _Symbolic(symbol)
    return names


def _unreadable(code: str, error: Exception) -> TranslationError:
    return TranslationError(
        f"the emitted code cannot be read back to check it ({type(error).__name__}: {error}):\n"
        f"{code}\nso nothing was generated; teach codegen/translation.py's stand-in for "
        "NumPy the function it uses"
    )


def read_printed(code: str, expr: sympy.Expr) -> sympy.Expr:
    """The expression that the printed NumPy expression ``code`` computes."""
    try:
        return _expr(eval(code, _namespace(expr)))  # noqa: S307 - code the printer just wrote
    except (AttributeError, NameError, TypeError, ValueError) as error:
        raise _unreadable(code, error) from error


def read_statements(
    lines: list[str], target: str, expr: sympy.Expr, reusing: bool = True
) -> sympy.Expr:
    """The expression that the statements ``lines`` leave in ``target``; ``reusing``: whether
    _k.buffer_reusing gives back its array (else a new one)."""
    names = _namespace(expr)
    names["_k"] = type("_KernelsHere", (_Kernels,), {"reusing": reusing})
    try:
        exec("\n".join(lines), names)  # noqa: S102 - code the lowering just wrote
    except (AttributeError, NameError, TypeError, ValueError) as error:
        raise _unreadable("\n".join(lines), error) from error
    return _expr(names[target])


def _elementary(expr: sympy.Expr) -> sympy.Expr:
    """The named functions of derive.functions written out (sigmoid, softplus, logaddexp)."""
    return expr.rewrite(sympy.exp)


def _numerically_equal(a: sympy.Expr, b: sympy.Expr, points: int = 6) -> bool:
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    generator = random.Random(20260105)
    a, b = _elementary(a), _elementary(b)
    for _ in range(points):
        values = {}
        for symbol in symbols:
            if symbol.is_integer:  # a size or a parameter
                values[symbol] = sympy.Integer(generator.randint(1, 5))
            else:
                values[symbol] = sympy.Float(generator.uniform(-2.0, 2.0), 30)
        left = sympy.N(a.xreplace(values), 30)
        right = sympy.N(b.xreplace(values), 30)
        if not (left.is_number and right.is_number):
            return False
        if left.has(sympy.nan, sympy.zoo) or right.has(sympy.nan, sympy.zoo):
            return False
        if abs(complex(left) - complex(right)) > 1e-15 * (1 + abs(complex(left))):
            return False
    return True


def equal(emitted: sympy.Expr, proven: sympy.Expr) -> bool:
    """Whether two elementwise expressions are equal: symbolically where SymPy can show
    it cheaply, numerically otherwise."""
    if emitted.has(sympy.nan):
        return False  # read from an array that was never written
    difference = emitted - proven
    if difference == 0 or sympy.expand(difference) == 0:
        return True
    if sympy.expand(_elementary(emitted) - _elementary(proven)) == 0:
        return True
    return _numerically_equal(emitted, proven)


def check(emitted: sympy.Expr, proven: sympy.Expr, code: str) -> None:
    if not equal(emitted, proven):
        raise TranslationError(
            f"the emitted code computes {emitted}, not the proven {proven}:\n{code}\n"
            "so nothing was generated (a bug in codegen/printer.py or codegen/ufuncs.py)"
        )


def check_printed(code: str, proven: sympy.Expr) -> None:
    """Raise TranslationError unless the printed ``code`` computes ``proven``."""
    check(read_printed(code, proven), proven, code)


def check_statements(lines: list[str], target: str, proven: sympy.Expr) -> None:
    """Raise TranslationError unless ``lines`` leave ``proven`` in ``target``.

    Statements that write over an operand (_k.buffer_reusing) must be right both when the
    target is that operand (no statement may then read it after the target is written) and
    when it is a new array."""
    code = "\n".join(lines)
    check(read_statements(lines, target, proven), proven, code)
    if "_k.buffer_reusing(" in code:
        check(read_statements(lines, target, proven, reusing=False), proven, code)


__all__ = ["TranslationError", "check_printed", "check_statements", "equal"]
