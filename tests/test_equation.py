"""Layers from one equation (derive/equation): the language's errors, the derived
gradients against finite differences and against their catalogue twins, the generic
lowering against its own element-by-element definition, and the commands."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnderive.cli import main
from codegen.render import UnverifiedError, render_equations
from derive import ir
from derive.equation import EquationError, layer_from_equation
from derive.equation.layer import layer_from_model
from derive.equation.model import model_of
from derive.symbolic import Evaluator
from derive.verify import VerificationError, prove

# Equations nobody designed the code around: the list and a few more.
EQUATIONS = {
    "strided_dilated": "Z[n,i,j,o] = b[o] + sum[c,u,v](pad(X,0,1,1,0)[n, 2*i+2*u, 2*j+2*v, c] * W[u,v,c,o])",
    "depthwise": "Z[n,i,j,c] = sum[u,v](X[n, i+u, j+v, c] * W[u,v,c])",
    "conv1d": "Z[n,t,o] = sum[c,k](X[n, t+k, c] * W[k,c,o])",
    "bilinear": "Z[n] = sum[i,j](X[n,i] * A[i,j] * Y[n,j])",
    "squared_distance": "Z[n,m] = sum[f]((X[n,f] - Y[m,f])**2)",
    "overlapping_max": "Z[n,i,j,c] = max[u<3, v<3](X[n, 2*i+u, 2*j+v, c])",
    "strided_conv": "Z[n,i,j,o] = b[o] + sum[c,u,v](pad(X,0,1,1,0)[n, 2*i+u, 2*j+v, c] * W[u,v,c,o])",
    "mean_pool": "Z[n,i,j,c] = mean[u<2, v<2](X[n, 2*i+u, 2*j+v, c])",
    "dense_tanh": "Z[n,o] = tanh(b[o] + sum[f](X[n,f] * W[f,o]))",
    "functions": "Z[n,f] = sigmoid(X[n,f]) * exp(-abs(X[n,f])) + log(1 + Y[f]**2) - sqrt(2 + relu(X[n,f]))",
    "shifted_sum": "Z[n,i] = sum[k<3](2 * X[n, i+k] * X[n, i+2-k]) / 3",
    "pool1d": "Z[n,i] = mean[k<4](X[n, 4*i+k])",
    "softmax": "Z[n,f] = exp(X[n,f]) / sum[g](exp(X[n,g]))",
    "normalise": "Z[n,c] = X[n,c] / sqrt(1 + sum[d](X[n,d]**2))",
    "trace": "Z[n] = sum[i](A[n,i,i])",
}

# Sizes for the numeric checks: larger than any sweep, every length > 1.
SIZES = {
    "strided_dilated": {"X": (2, 9, 8, 3), "W": (3, 2, 3, 4), "b": (4,)},
    "depthwise": {"X": (2, 7, 6, 3), "W": (3, 2, 3)},
    "conv1d": {"X": (3, 10, 2), "W": (4, 2, 3)},
    "bilinear": {"X": (4, 5), "A": (5, 3), "Y": (4, 3)},
    "squared_distance": {"X": (5, 4), "Y": (3, 4)},
    "overlapping_max": {"X": (2, 9, 7, 2)},
    "strided_conv": {"X": (2, 7, 8, 3), "W": (3, 3, 3, 2), "b": (2,)},
    "mean_pool": {"X": (2, 6, 7, 3)},
    "dense_tanh": {"X": (4, 6), "W": (6, 3), "b": (3,)},
    "functions": {"X": (3, 4), "Y": (4,)},
    "shifted_sum": {"X": (2, 9)},
    "pool1d": {"X": (2, 11)},
    "softmax": {"X": (3, 5)},
    "normalise": {"X": (3, 5)},
    "trace": {"A": (2, 4, 4)},
}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """All the equations above, proven and generated into one package, imported."""
    layers = [layer_from_equation(name, text) for name, text in EQUATIONS.items()]
    files = render_equations(layers)
    folder = tmp_path_factory.mktemp("equations")
    (folder / "eqpkg").mkdir()
    for name, text in files.items():
        (folder / "eqpkg" / name).write_text(text, encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        yield {name: importlib.import_module(f"eqpkg.{name}") for name in EQUATIONS}, files
    finally:
        sys.path.remove(str(folder))
        for name in list(sys.modules):
            if name == "eqpkg" or name.startswith("eqpkg."):
                del sys.modules[name]


def _inputs(name, rng):
    return {array: rng.standard_normal(shape) for array, shape in SIZES[name].items()}


@pytest.mark.parametrize("name", list(EQUATIONS))
def test_equation_gradients_match_finite_differences(package, name):
    """Directional derivatives of L = sum(dout * out), in float64: each gradient's inner
    product with random directions against central differences, to 1e-8."""
    modules, _ = package
    module = modules[name]
    rng = np.random.default_rng(7)
    arrays = _inputs(name, rng)
    out, cache = module.forward(**arrays)
    dout = rng.standard_normal(out.shape)
    gradients = module.backward(dout, cache)
    assert set(gradients) == set(arrays)
    eps = 1e-6
    for array, value in arrays.items():
        assert gradients[array].shape == value.shape and gradients[array].dtype == np.float64
        for _ in range(3):
            direction = rng.standard_normal(value.shape)
            plus = module.forward(**{**arrays, array: value + eps * direction})[0]
            minus = module.forward(**{**arrays, array: value - eps * direction})[0]
            numeric = np.sum(dout * (plus - minus)) / (2 * eps)
            analytic = np.sum(gradients[array] * direction)
            assert abs(numeric - analytic) <= 1e-8 * max(1.0, abs(analytic)), (
                array,
                numeric,
                analytic,
            )


def test_named_forms_are_emitted_where_a_rule_recognises_the_reduction(package):
    _, files = package
    assert (
        "_k.correlate(" in files["strided_conv.py"]
        and "_k.full_convolve(" in files["strided_conv.py"]
    )
    assert "_k.window_argmax(" in files["overlapping_max.py"]
    assert "_k.route_to_argmax(" in files["overlapping_max.py"]
    assert "_k.window_sum(" in files["mean_pool.py"]
    assert " @ " in files["dense_tanh.py"]
    # A dilated kernel is no catalogue primitive: the generic index-space form.
    assert "_ix.scatter_contract(" in files["strided_dilated.py"]
    assert "_ix.contract(" in files["depthwise.py"]


def test_the_package_needs_numpy_only(package, tmp_path):
    _, files = package
    (tmp_path / "alone").mkdir()
    for name, text in files.items():
        (tmp_path / "alone" / name).write_text(text, encoding="utf-8")
    code = (
        "import sys\n"
        "for blocked in ('sympy', 'jinja2', 'derive', 'codegen', 'cnnderive'):\n"
        "    sys.modules[blocked] = None\n"
        "import numpy as np, alone.conv1d as c\n"
        "out, cache = c.forward(X=np.ones((1, 5, 2)), W=np.ones((3, 2, 4)))\n"
        "print(out.shape, sorted(c.backward(np.ones_like(out), cache)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 4) ['W', 'X']"


# ---------------------------------------------------------------------------
# Catalogue twins
# ---------------------------------------------------------------------------


def test_an_equation_convolution_equals_the_catalogue_conv2d(package):
    from generated import conv2d

    modules, _ = package
    rng = np.random.default_rng(1)
    arrays = _inputs("strided_conv", rng)
    out, cache = modules["strided_conv"].forward(**arrays)
    twin, twin_cache = conv2d.forward(arrays["X"], arrays["W"], arrays["b"], stride=2, padding=1)
    np.testing.assert_allclose(out, twin, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    gradients = modules["strided_conv"].backward(dout, cache)
    dx, dw, db = conv2d.backward(dout, twin_cache)
    for mine, theirs in ((gradients["X"], dx), (gradients["W"], dw), (gradients["b"], db)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)


def test_equation_pools_equal_the_catalogue_pools(package):
    from generated import avgpool2d, maxpool2d

    modules, _ = package
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, size=(2, 9, 7, 2)).astype(np.float64)  # ties everywhere
    for module, twin, size, stride in (
        (modules["overlapping_max"], maxpool2d, 3, 2),
        (modules["mean_pool"], avgpool2d, 2, 2),
    ):
        out, cache = module.forward(X=x)
        twin_out, twin_cache = twin.forward(x, size=size, stride=stride)
        np.testing.assert_array_equal(out, twin_out)
        dout = rng.standard_normal(out.shape)
        np.testing.assert_allclose(
            module.backward(dout, cache)["X"], twin.backward(dout, twin_cache), rtol=1e-12, atol=0
        )


def test_the_catalogue_finds_the_closed_forms_it_used_to_write_by_hand():
    """The trees derive/layers.py held before its gradients came from the derivation."""
    from derive import layers as L

    x, w, dout = ir.Operand("x"), ir.Operand("w"), ir.Operand("dout")
    dx, dw, db = (g.cases[0].tree for g in L.conv2d.gradients)
    assert dx == ir.Crop(
        ir.FullConvolve(ir.Dilate(dout, L.STRIDE), ir.Rot180(w)), L.PADDING, L.PADDING, L._H, L._W
    )
    assert dw == ir.CorrelateWeights(
        ir.Crop(
            ir.Operand("x_padded"),
            0,
            0,
            (L._OH - 1) * L.STRIDE + L._KH,
            (L._OW - 1) * L.STRIDE + L._KW,
        ),
        ir.Dilate(dout, L.STRIDE),
    )
    assert db == ir.Sum(dout, (0, 1, 2))
    assert L.conv2d.forward[0] == ("x_padded", ir.Pad(x, L.PADDING, L.PADDING))
    (route,) = L.maxpool2d.gradients[0].cases
    assert route.tree == ir.RouteToArgmax(
        dout, ir.Operand("argmax"), L.SIZE, L.STRIDE, L._PH, L._PW
    )
    kron, scatter = L.avgpool2d.gradients[0].cases
    assert isinstance(kron.tree, ir.Crop) and isinstance(kron.tree.a, ir.Upsample)
    assert str(kron.condition) == "Eq(size, stride)" or str(kron.condition) == "Eq(stride, size)"
    assert isinstance(scatter.tree, ir.ScatterWindows)
    dx, dw, db = (g.cases[0].tree for g in L.dense.gradients)
    assert dx == ir.MatMul(dout, ir.Transpose(w))
    assert dw == ir.MatMul(ir.Transpose(x), dout)
    assert db == ir.Sum(dout, (0,))


# ---------------------------------------------------------------------------
# The generic lowering, proven and checked against its definition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["strided_conv", "overlapping_max", "mean_pool", "dense_tanh"])
def test_the_generic_form_of_a_named_layer_is_proven_too(name):
    """Where a rule names the closed form, the generic index-space form is still right."""
    model = model_of(EQUATIONS[name])
    layer = layer_from_model(name, model, named=False)
    assert not any(
        isinstance(n, (ir.Correlate, ir.WindowSum, ir.WindowArgmax, ir.MatMul))
        for g in layer.gradients
        for c in g.cases
        for n in c.tree.walk()
    )
    for config in layer.configurations()[:3]:
        prove(layer, config)


@pytest.mark.parametrize("name", list(EQUATIONS))
def test_the_index_space_runtime_agrees_with_the_symbolic_interpreter(package, name):
    """codegen/runtime/indexed.py (the code that runs) against derive/symbolic.py (the
    element-by-element meaning that was proven), on the generic trees, with float64
    values and with small integers that tie."""
    from codegen.render import indexed_runtime

    namespace: dict = {}
    exec(compile(indexed_runtime(), "indexed.py", "exec"), namespace)  # noqa: S102
    model = model_of(EQUATIONS[name])
    layer = layer_from_model(name, model, named=False)
    rng = np.random.default_rng(3)
    for draw in (lambda shape: rng.standard_normal(shape), lambda shape: rng.integers(0, 3, shape)):
        arrays = {array: draw(shape).astype(np.float64) for array, shape in SIZES[name].items()}
        symbolic = Evaluator({k: v.astype(object) for k, v in arrays.items()}, {})
        numeric = _NumpyTrees(namespace, arrays)
        for binding, tree in layer.forward:
            symbolic.env[binding] = symbolic(tree)
            numeric.env[binding] = numeric(tree)
        dout = rng.standard_normal(np.shape(numeric.env["out"]))
        symbolic.env["dout"], numeric.env["dout"] = dout.astype(object), dout
        for gradient in layer.gradients:
            for case in gradient.cases:
                expected = np.asarray(symbolic(case.tree), dtype=np.float64)
                np.testing.assert_allclose(numeric(case.tree), expected, rtol=1e-10, atol=1e-10)


class _NumpyTrees:
    """Evaluates generic trees with the runtime's functions (a small reading of what
    codegen emits, enough for these trees)."""

    def __init__(self, runtime, env):
        self.runtime = runtime
        self.env = dict(env)

    def integers(self, exprs):
        values = {}
        for name, array in self.env.items():
            for axis, length in enumerate(np.shape(array)):
                values[f"{name}_size{axis}"] = length
        import sympy

        return tuple(
            int(
                sympy.sympify(e).xreplace(
                    {s: values[s.name] for s in sympy.sympify(e).free_symbols}
                )
            )
            for e in exprs
        )

    def __call__(self, node):
        r = self.runtime
        if isinstance(node, ir.Operand):
            return self.env[node.name]
        if isinstance(node, ir.IndexView):
            return r["index_view"](
                self(node.a), node.read.text(), " ".join(node.indices), self.integers(node.extents)
            )
        if isinstance(node, ir.Contract):
            return r["contract"](
                [" ".join(s) for s in node.subscripts],
                " ".join(node.out_indices),
                *[self(f) for f in node.factors],
            )
        if isinstance(node, ir.ScatterContract):
            return r["scatter_contract"](
                self.integers(node.shape), node.write.text(), " ".join(node.index_names),
                self.integers(node.index_extents), [" ".join(s) for s in node.subscripts],
                *[self(f) for f in node.factors],
            )  # fmt: skip
        if isinstance(node, ir.ZeroPad):
            return r["zero_pad"](self(node.a), self.integers(node.widths))
        if isinstance(node, ir.CropAxes):
            return r["crop_axes"](
                self(node.a), self.integers(node.starts), self.integers(node.extents)
            )

        def window(n):
            return (n.read.text(), " ".join(n.kept), " ".join(n.reduced), self.integers(n.extents))

        if isinstance(node, ir.ArgmaxView):
            return r["argmax_view"](self(node.a), *window(node))
        if isinstance(node, ir.TakeView):
            return r["take_view"](self(node.a), self(node.index), *window(node))
        if isinstance(node, ir.RouteView):
            return r["route_view"](
                self(node.g), self(node.index), *window(node), self.integers(node.shape)
            )
        if isinstance(node, ir.Pointwise):
            import sympy

            from codegen.printer import array_code

            names = {s: sympy.Symbol(f"v{k}") for k, (s, _) in enumerate(node.arguments)}
            values = {names[s].name: self(child) for s, child in node.arguments}
            with np.errstate(all="ignore"):
                return eval(array_code(node.expr.xreplace(names)), {"np": np, "numpy": np}, values)  # noqa: S307
        if isinstance(node, ir.Sum):
            return self(node.a).sum(axis=node.axes)
        raise TypeError(type(node).__name__)


def test_a_wrong_derived_tree_is_refused_by_the_proof_and_by_codegen():
    """Break one derived gradient (the kernel offset's block one step off): the proof
    names it, and nothing is generated."""
    layer = layer_from_equation("shifted", "Z[n,i] = sum[k<2](X[n, i+k] * W[k])")
    (dx,) = [g for g in layer.gradients if g.wrt == "X"]
    tree = dx.cases[0].tree
    shifted = ir.IndexMap(tree.write.axes, (tree.write.offsets[0], tree.write.offsets[1] + 1))
    broken = ir.ScatterContract(
        tree.factors, tree.subscripts, shifted, tree.index_names, tree.index_extents, tree.shape
    )
    from dataclasses import replace

    layer.gradients = tuple(
        replace(g, cases=(ir.Case(broken, name="off by one"),)) if g.wrt == "X" else g
        for g in layer.gradients
    )
    with pytest.raises(VerificationError, match="shifted dX"):
        for config in layer.configurations():
            prove(layer, config)
    with pytest.raises(UnverifiedError, match="nothing was generated"):
        render_equations([layer])


# ---------------------------------------------------------------------------
# Bad equations: one line, exit 2, pointing at the offending part
# ---------------------------------------------------------------------------

BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("Z = X[n]", "output and its indices"),
    ("Z[n] X[n]", "expected '='"),
    ("Z[n] =", "right side"),
    ("Z[n] = foo(X[n])", "unknown function 'foo'"),
    ("Z[n] = softmax(X[n])", "unknown function 'softmax'"),
    ("Z[n,i] = sum[u](X[n, i+u])", "index 'u' has no range"),
    ("Z[n,i] = X[n, i*i]", "not affine"),
    ("Z[n,i,j] = X[n, i*j]", "not affine"),
    ("Z[n,i] = X[n, i//2]", "not affine"),
    ("Z[n,i] = X[n, i/2]", "not affine"),
    ("Z[n,i] = X[n, i%2]", "not affine"),
    ("Z[n,k] = X[n, 0]", "output index 'k' is used nowhere"),
    ("Z[n] = (X[n]", "not closed"),
    ("Z[n] = X[n]]", "closes nothing"),
    ("Z[n] = X[n", "not closed"),
    ("Z[n] = sum[f](X[n, f)", "'[' opened here is not closed"),
    ("Z[n] = X[n] + X[n, 1]", "used with 1 index and with 2"),
    ("Z[n,i] = sum[i](X[n, i])", "an output index"),
    ("Z[n] = X[n] * Y", "stands alone"),
    ("Z[n] = X[n] Y[n]", "after a complete expression"),
    ("Z[n,i] = X[n, i-1]", "negative"),
    ("Z[n] = Z[n] + X[n]", "is read on the right side"),
    ("Z[n,n] = X[n]", "appears twice"),
    ("Z[n] = sum[f,f](X[n,f])", "listed twice"),
    ("Z[n] = sum[f<0](X[n,f])", "positive integer"),
    ("Z[n] = X[n, k]", "neither an output index nor reduced"),
    ("Z[n] = max[f](X[n,f] * 2)", "one array element"),
    ("Z[n] = sum[f](sum[g](X[n,f,g]))", "inside another reduction"),
    ("Z[n] = sum[f](X[n, 1])", "never uses"),
    ("Z[n,i] = pad(X, 1)[n, i]", "one width per axis"),
    ("Z[n] = X[n] $ 2", "unexpected character"),
    ("Z[n] = X[n, 1.5]", "whole numbers"),
    ("Z[n,i,j] = X[n, i+j]", "cannot find the ranges"),
    ("Z[n] = exp(X[n], 2)", "takes one argument"),
    ("Z[n] = sum(X[n])", "needs its indices"),
]


@pytest.mark.parametrize("text, expected", BAD)
def test_a_bad_equation_gets_one_clear_line_and_exit_2(text, expected, capsys):
    code = main(["derive", "--equation", text])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cnnderive derive: error: equation: ")
    assert expected in err, err


def test_an_error_points_at_the_offending_part():
    with pytest.raises(EquationError) as info:
        layer_from_equation("bad", "Z[n,o] = sum[f](X[n,f] * W[f*o, o])")
    assert "at column 28 ('f*o')" in str(info.value)


def test_generate_equation_writes_a_package_and_refuses_what_it_cannot(tmp_path, capsys):
    output = tmp_path / "mine"
    code = main(
        [
            "generate",
            "--equation",
            "c1: Z[n,t,o] = sum[c,k](X[n, t+k, c] * W[k,c,o])",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in output.iterdir()) == [
        "__init__.py",
        "_indexed.py",
        "_kernels.py",
        "c1.py",
    ]
    assert main(["generate", "--equation", "Z[n] = X[n]", "--output", str(output)]) == 2
    assert "name the layer" in capsys.readouterr().err
    assert main(["generate", "--equation", "c1: Z[n] = X[n]"]) == 2
    assert "--output" in capsys.readouterr().err


def test_derive_and_verify_an_equation(capsys):
    assert main(["derive", "--equation", "Z[n,i,c] = max[u<3](X[n, 2*i+u, c])"]) == 0
    out = capsys.readouterr().out
    assert "solved: i = (a[1] - u)/(2) when a[1] - u a multiple of 2" in out
    assert main(["verify", "--equation", "p: Z[n,i,c] = max[u<3](X[n, 2*i+u, c])"]) == 0
    assert "p " in capsys.readouterr().out
    assert main(["derive", "conv2d", "--equation", "Z[n] = X[n]"]) == 2


def test_the_training_commands_say_how_to_recover_from_a_broken_generated(tmp_path):
    """A generated/ that cannot be imported (here a copy of the packages whose
    generated/__init__.py has a syntax error): train says so in one line and names
    `cnnderive generate`; derive still works.  (A user's generated/ that shadows
    cnnderive's is named as such: tests/test_robustness.py.)"""
    import os
    import shutil

    repository = Path(__file__).resolve().parent.parent
    copy = tmp_path / "copy"
    for package in ("cnnderive", "cnnderive_common", "derive", "codegen", "generated"):
        shutil.copytree(repository / package, copy / package)
    (copy / "generated" / "__init__.py").write_text("this is not python(\n")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    train = subprocess.run(
        [sys.executable, "-m", "cnnderive", "train", "--net", "toy"],
        capture_output=True, text=True, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "cnnderive generate" in train.stderr and len(train.stderr.strip().splitlines()) == 1
    derive = subprocess.run(
        [sys.executable, "-m", "cnnderive", "derive", "relu"],
        capture_output=True, text=True, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert derive.returncode == 0


def test_the_book_has_a_page_for_an_equation_layer(tmp_path, capsys):
    from cnnderive.book import katex

    try:
        katex.find_katex(None)
    except katex.KatexMissing as error:
        pytest.skip(str(error))
    equation = "sd: Z[n,m] = sum[f]((X[n,f] - Y[m,f])**2)"
    code = main(["book", str(tmp_path / "book"), "--layer", "dense", "--equation", equation])
    assert code == 0, capsys.readouterr().err
    page = (tmp_path / "book" / "layers" / "sd.html").read_text(encoding="utf-8")
    assert "katex-error" not in page and "agrees" in page and "scatter_contract" in page
    assert main(["book", str(tmp_path / "b2"), "--equation", "dense: Z[n] = X[n]"]) == 2
    assert "is taken" in capsys.readouterr().err
