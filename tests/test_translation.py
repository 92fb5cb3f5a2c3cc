"""The translators are checked: every statement the emitter writes for a pointwise
expression is read back and compared with the proven expression (codegen/translation.py),
and the stable forms emitted are the ones derive/ proves, read from derive.functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import sympy

from codegen import emit, printer, translation
from codegen.emit import Emitter
from codegen.printer import array_code
from codegen.translation import TranslationError, check_printed, check_statements
from derive import functions, ir
from derive.functions import sigmoid, softplus
from derive.layers import LAYERS

REPOSITORY = Path(__file__).resolve().parent.parent
z, a, b = sympy.symbols("z a b", real=True)


# Pointwise forms the catalogue does not lower today, but the lowering handles.
EXTRA_TREES = [
    ir.pointwise(softplus(z), z=ir.Operand("x")),
    ir.pointwise(
        sympy.Min(z, 0) * a - sympy.sqrt(b) / 3,
        z=ir.Operand("x"),
        a=ir.Operand("y"),
        b=ir.Operand("w"),
    ),
]


def _emit_all_layers():
    """Emit every forward and backward tree of the catalogue, as render does, and a few more."""
    for layer in [*LAYERS.values(), None]:
        if layer is None:
            trees = EXTRA_TREES
        else:
            trees = [tree for _, tree in layer.forward]
            trees += [case.tree for gradient in layer.gradients for case in gradient.cases]
        for number, tree in enumerate(trees):
            emitter = Emitter(
                names={"workspace"},
                workspace="workspace",
                function=f"f{number}",
                reuse_arguments=True,
            )
            emitter.count(tree)
            emitter.assign("result", tree)
            plain = Emitter(names=set(), function=f"g{number}")
            plain.count(tree)
            plain.assign("result", tree)


def test_every_pointwise_statement_of_the_catalogue_is_checked(monkeypatch):
    checked = []
    monkeypatch.setattr(emit, "check_statements", lambda *args: checked.append(args))
    monkeypatch.setattr(emit, "check_printed", lambda *args: checked.append(args))
    _emit_all_layers()
    assert len(checked) > 20


def test_the_catalogue_translates_exactly():
    _emit_all_layers()  # raises TranslationError on a difference


def _mutated_module(name: str, old: str, new: str):
    source = (REPOSITORY / "codegen" / f"{name}.py").read_text(encoding="utf-8")
    assert source.count(old) == 1, f"the mutation's anchor is gone from {name}.py: {old!r}"
    spec = importlib.util.spec_from_loader(f"mutated_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source.replace(old, new), f"mutated {name}.py", "exec"), module.__dict__)
    return module


UFUNC_MUTATIONS = [
    (
        "c - x with its operands swapped",
        'self.emit(f"np.subtract({minuend}, {subtrahend}, out={dest}, dtype={dest}.dtype)")',
        'self.emit(f"np.subtract({subtrahend}, {minuend}, out={dest}, dtype={dest}.dtype)")',
    ),
    (
        "-a + b swapped without its signs",
        "            terms[0], terms[1] = terms[1], terms[0]",
        "            terms[0], terms[1] = -terms[1], -terms[0]",
    ),
    (
        "a scalar denominator multiplied instead of divided",
        'accumulated = self.fold("np.divide", accumulated, scalar_denominator, dest)',
        'accumulated = self.fold("np.multiply", accumulated, scalar_denominator, dest)',
    ),
    (
        "logaddexp with its first argument dropped",
        'self.emit(f"np.logaddexp({first}, {second}, out={dest})")',
        'self.emit(f"np.logaddexp({second}, {second}, out={dest})")',
    ),
]


@pytest.mark.parametrize("bug, old, new", UFUNC_MUTATIONS, ids=[m[0] for m in UFUNC_MUTATIONS])
def test_a_lowering_with_a_bug_is_refused(monkeypatch, bug, old, new):
    mutated = _mutated_module("ufuncs", old, new)
    monkeypatch.setattr(emit, "UfuncLowering", mutated.UfuncLowering)
    with pytest.raises(TranslationError, match="not the proven"):
        _emit_all_layers()


def test_a_printer_with_a_bug_is_refused(monkeypatch):
    monkeypatch.setattr(
        printer.ArrayExpressionPrinter,
        "_print_logaddexp",
        lambda self, expr: (
            f"np.logaddexp({self._print(expr.args[1])}, {self._print(expr.args[1])})"
        ),
    )
    with pytest.raises(TranslationError, match="not the proven"):
        check_printed(array_code(softplus(z)), softplus(z))


def test_the_emitted_stable_forms_are_read_from_derive(monkeypatch):
    assert array_code(softplus(z)) == "np.logaddexp(0, z)"
    assert "np.exp(-z)" in array_code(sigmoid(z))
    u = functions.STABLE_FORM_SYMBOL
    changed = dict(functions.STABLE_FORMS)
    changed["softplus"] = (changed["softplus"][0], sympy.log(1 + sympy.exp(u)))
    monkeypatch.setattr(functions, "STABLE_FORMS", changed)
    monkeypatch.setattr(printer, "STABLE_FORMS", changed)
    assert array_code(softplus(z)) == "np.log(np.exp(z) + 1)"


def test_statements_are_read_back_into_their_expression():
    lines = [
        'out = _k.buffer(workspace, "k", a.shape, a.dtype)',
        "np.subtract(1, a, out=out, dtype=out.dtype)",
        "np.multiply(out, b, out=out)",
    ]
    check_statements(lines, "out", (1 - a) * b)
    with pytest.raises(TranslationError):
        check_statements(lines, "out", (a - 1) * b)
    # An array read before anything was written into it is refused.
    with pytest.raises(TranslationError):
        check_statements(lines[:1], "out", a)


def test_statements_that_may_write_over_an_operand_are_checked_both_ways():
    """_k.buffer_reusing gives back its operand or a new array, by the shapes at run time:
    the statements must be right either way."""
    reusing = 'out = _k.buffer_reusing(z, workspace, "k", z.shape, z.dtype)'
    check_statements(
        [reusing, "np.add(a, z, out=out)", "np.exp(out, out=out)"], "out", sympy.exp(a + z)
    )
    # z read again after out, which may be z, was written.
    with pytest.raises(TranslationError):
        check_statements(
            [reusing, "np.exp(z, out=out)", "np.add(out, z, out=out)"], "out", sympy.exp(z) + z
        )
    # out read before anything was written into it: right only when it is z.
    with pytest.raises(TranslationError):
        check_statements([reusing, "np.add(out, a, out=out)"], "out", z + a)


def _emitted(tree, reuse_arguments=True, also=()):
    emitter = Emitter(
        names={"workspace", "x", "w", "b"},
        workspace="workspace",
        function="forward",
        reuse_arguments=reuse_arguments,
    )
    for counted in (tree, *also):
        emitter.count(counted)
    emitter.assign("out", tree)
    return "\n".join(emitter.lines)


def test_a_statement_writes_over_an_array_of_its_own_that_nothing_else_reads():
    """Reference: the same statement into a kept array of its own, computed by NumPy."""
    import numpy as np

    from generated import _kernels

    correlated = ir.Correlate(ir.Operand("x"), ir.Operand("w"))
    tree = ir.pointwise(b + z, b=ir.Operand("b"), z=correlated)
    code = _emitted(tree)
    assert "_k.buffer_reusing(z, workspace" in code
    rng = np.random.default_rng(0)
    x, w, bias = rng.random((2, 5, 5, 3)), rng.random((3, 3, 3, 4)), rng.random(4)
    for workspace in (None, {}):
        names = {"np": np, "_k": _kernels, "x": x, "w": w, "b": bias, "workspace": workspace}
        exec(code, names)
        want = _kernels.correlate(x, w) + bias
        assert np.array_equal(names["out"], want) and names["out"] is names["z"]
    # Not when another tree of the function reads the same array, when the statement reads
    # it after its first computation, when the operand may be a view of an input (pad
    # gives back its input when it adds nothing), or when the emitter is not told that
    # every tree was counted.
    assert "buffer_reusing" not in _emitted(tree, also=[ir.pointwise(2 * z, z=correlated)])
    assert "buffer_reusing" not in _emitted(ir.pointwise(sympy.exp(z) + z, z=correlated))
    assert "buffer_reusing" not in _emitted(
        ir.pointwise(b + z, b=ir.Operand("b"), z=ir.Pad(ir.Operand("x"), 0, 0))
    )
    assert "buffer_reusing" not in _emitted(tree, reuse_arguments=False)


def test_masks_and_named_functions_are_compared_numerically_when_needed():
    assert translation.equal(
        translation.read_printed("(a * (z > 0))", a * z), sympy.Piecewise((a, z > 0), (0, True))
    )
    assert translation.equal(
        translation.read_printed("np.maximum(z, 0) + np.log(1 + np.exp(-np.abs(z)))", z),
        softplus(z),
    )
    assert not translation.equal(
        translation.read_printed("np.maximum(z, 0) + np.log(1 + np.exp(np.abs(z)))", z),
        softplus(z),
    )


def test_code_the_checker_cannot_read_is_refused_with_the_way_out():
    with pytest.raises(TranslationError, match="teach codegen/translation.py"):
        check_printed("np.cbrt(z)", z)


def test_python_abs_and_np_sign_are_read_back():
    assert translation.equal(translation.read_printed("np.sign(z) * abs(z)", z), z)
