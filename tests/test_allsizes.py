"""The all-sizes prover (derive/allsizes.py): it proves the catalogue for symbolic sizes,
and it refutes deliberately broken closed forms with counterexamples that NumPy and the
generated code then confirm: the correct gradient (generated code) and the broken tree
(evaluated on numbers) differ at the element the prover names, and the prover's two
written-out values are those two numbers."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import time

import numpy as np
import pytest
import sympy

from derive import allsizes
from derive.claims import ClaimError, check_gradient, sum_over
from derive.ir import (
    Case,
    CorrelateWeights,
    Crop,
    Dilate,
    FullConvolve,
    MatMul,
    Operand,
    ReshapeLike,
    Rot180,
    RouteToArgmax,
    ScatterWindows,
    Softmax,
    Sum,
    Transpose,
    Upsample,
    pointwise,
)
from derive.layer import Gradient
from derive.layers import LAYERS, PADDING, SIZE, STRIDE
from derive.symbolic import Evaluator

conv, avgpool, dense = LAYERS["conv2d"], LAYERS["avgpool2d"], LAYERS["dense"]
dout, x, w = Operand("dout"), Operand("x"), Operand("w")
H, W = conv.input("x").axes[1:3]
PH, PW = avgpool.input("x").axes[1:3]


def with_gradient(layer, name, tree, condition=sympy.true):
    """``layer`` with its gradient ``name`` replaced by one case: ``tree``."""
    gradients = tuple(
        Gradient(g.name, g.wrt, (Case(tree, condition, "broken"),)) if g.name == name else g
        for g in layer.gradients
    )
    return dataclasses.replace(layer, gradients=gradients)


def refutation(layer, name):
    """The first refuted statement about gradient ``name``."""
    result = allsizes.prove_layer(layer)
    assert result.route == "index sets"
    refuted = [
        s for s in result.statements if s.what.startswith(name) and s.outcome.status == "refuted"
    ]
    assert refuted, [(s.what, s.fixed, s.outcome.status) for s in result.statements]
    return refuted[0].outcome.counterexample


def configuration(layer, sizes):
    symbols = allsizes.size_dims(layer) + [p.symbol for p in layer.params]
    return {s: sizes[s.name] for s in symbols}


def confirm_numerically(layer, broken_layer, name, counterexample, correct_gradient):
    """Evaluate the broken tree on random numbers at the counterexample's sizes, compare
    with ``correct_gradient(arrays, upstream, config)`` (the generated code), and check the
    prover's written-out values against both."""
    rng = np.random.default_rng(0)
    config = configuration(layer, counterexample.sizes)
    assert not layer.violated(config)
    arrays = {item.name: rng.standard_normal(shape) for item, shape in
              zip(layer.inputs, layer.shapes(config).values())}  # fmt: skip
    env = {k: v.astype(object) for k, v in arrays.items()}
    evaluator = Evaluator(env, config)
    for binding, node in layer.forward:
        evaluator.env[binding] = evaluator(node)
    upstream = rng.standard_normal(np.shape(evaluator.env[layer.output]))
    evaluator.env[layer.upstream] = upstream.astype(object)
    gradient = next(g for g in broken_layer.gradients if g.name == name)
    broken = np.asarray(evaluator(gradient.cases[0].tree), dtype=object)
    correct = correct_gradient(arrays, upstream, config)
    element = tuple(counterexample.element)
    values = dict(arrays, **{layer.upstream: upstream})

    def number(expr):
        replacements = {
            atom: values[str(atom.base.label)][tuple(int(i) for i in atom.indices)]
            for atom in sympy.sympify(expr).atoms(sympy.Indexed)
        }
        return float(sympy.sympify(expr).xreplace(replacements))

    broken_value = float(broken[element]) if broken.shape == correct.shape else None
    assert number(counterexample.left) == pytest.approx(correct[element])
    if broken_value is not None:
        assert number(counterexample.right) == pytest.approx(broken_value)
        assert not np.isclose(correct[element], broken_value)
    return correct, broken


def generated_conv(arrays, upstream, config):
    module = importlib.import_module("generated.conv2d")
    _, cache = module.forward(
        arrays["x"], arrays["w"], arrays["b"], stride=config[STRIDE], padding=config[PADDING]
    )
    dx, dw, _ = module.backward(upstream, cache)
    return {"dx": dx, "dw": dw}


def generated_avgpool(arrays, upstream, config):
    module = importlib.import_module("generated.avgpool2d")
    _, cache = module.forward(arrays["x"], size=config[SIZE], stride=config[STRIDE])
    return module.backward(upstream, cache)


def generated_dense(arrays, upstream, config):
    module = importlib.import_module("generated.dense")
    _, cache = module.forward(arrays["x"], arrays["w"], arrays["b"])
    dx, dw, db = module.backward(upstream, cache)
    return {"dx": dx, "dw": dw, "db": db}


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------


def test_the_catalogue_is_proven_for_all_sizes_or_says_why_not():
    results = {name: allsizes.prove_layer(layer) for name, layer in LAYERS.items()}
    for name in ("conv2d", "avgpool2d", "dense"):
        assert results[name].route == "index sets" and results[name].status == "proven", name
    for name in ("conv2d", "avgpool2d", "maxpool2d"):  # the stride symbolic too
        for statement in results[name].statements:
            assert statement.fixed == {} and ", s" in statement.sizes, (name, statement)
    for name in ("sigmoid", "relu", "tanh", "softmax", "bce", "bce_with_logits",
                 "softmax_cross_entropy", "mse"):  # fmt: skip
        assert results[name].route == "pointwise" and results[name].status == "proven", name
    assert results["maxpool2d"].route == "index sets" and results["maxpool2d"].status == "proven"
    assert "held fixed" in results["maxpool2d"].note  # the tie rule, and what the sweep checks
    assert results["flatten"].route == "row-major lemma" and results["flatten"].status == "proven"


def test_verify_all_sizes_command_says_what_was_proven_within_ten_seconds():
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "cnnderive", "verify", "--all-sizes"],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "conv2d dx" in out and "proven for all m, H, W, C_in, K_H, K_W, C_out, s, p" in out
    assert "maxpool2d dx" in out and "flatten dx" in out and "mixed-radix lemma" in out
    assert "13 of 13 layers for all sizes" in out
    assert "s wall time" in out
    assert elapsed < 30  # the command's own budget is 10 s; the margin is for a busy machine


def test_a_layer_the_prover_cannot_read_is_sent_to_the_sweep_which_refutes_it():
    """Never a silent pass: a flatten gradient that is not the row-major reshape is not
    recognised, the output says why, and the sweep (as verify --all-sizes runs it) refutes it."""
    from derive.verify import verify_layers

    flatten = LAYERS["flatten"]
    doubled = ReshapeLike(pointwise("2*g", g=Operand("dout")), x)
    broken = with_gradient(flatten, "dx", doubled)
    result = allsizes.prove_layer(broken)
    assert result.route == "sweep" and "(h W + w) C + c" in result.reason
    (sweep,) = verify_layers([broken], workers=1)
    assert not sweep.ok and "dx" in sweep.error


def test_all_sizes_and_seed_size_exclude_each_other():
    run = subprocess.run(
        [sys.executable, "-m", "cnnderive", "verify", "--all-sizes", "--seed-size"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "exclude each other" in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------------
# Broken closed forms
# ---------------------------------------------------------------------------

CORRECT_DX = Crop(FullConvolve(Dilate(dout, STRIDE), Rot180(w)), PADDING, PADDING, H, W)

BROKEN_CONV_DX = {
    "off-by-one crop": Crop(
        FullConvolve(Dilate(dout, STRIDE), Rot180(w)), PADDING + 1, PADDING, H, W
    ),
    "missing rot180": Crop(FullConvolve(Dilate(dout, STRIDE), w), PADDING, PADDING, H, W),
    "stride-1 form for every stride": Crop(FullConvolve(dout, Rot180(w)), PADDING, PADDING, H, W),
    # Zero unless H + p > 5 + y: beyond every configuration of the sweep (H <= 4, p <= 1).
    "a term beyond the sweep": pointwise(
        "a + b",
        a=CORRECT_DX,
        b=Crop(FullConvolve(Dilate(dout, STRIDE), Rot180(w)), PADDING + 5, PADDING, H, W),
    ),
}


@pytest.mark.parametrize("what", list(BROKEN_CONV_DX))
def test_broken_conv_dx_is_refuted_with_a_counterexample_numpy_confirms(what):
    broken = with_gradient(conv, "dx", BROKEN_CONV_DX[what])
    counterexample = refutation(broken, "dx")
    confirm_numerically(conv, broken, "dx", counterexample,
                        lambda a, u, c: generated_conv(a, u, c)["dx"])  # fmt: skip


def test_a_term_beyond_the_sweep_passes_the_sweep_but_not_the_all_sizes_proof():
    from derive.verify import VerificationError, prove

    broken = with_gradient(conv, "dx", BROKEN_CONV_DX["a term beyond the sweep"])
    largest = [c for c in conv.configurations() if c[H] == 4 and c[W] == 4][:6]
    for config in largest:
        prove(broken, config)  # no VerificationError: the sweep cannot see the term
    counterexample = refutation(broken, "dx")
    sizes = counterexample.sizes
    # Outside the sweep: a larger input, or a larger padding, than it has.
    assert max(sizes["in_height"], sizes["in_width"]) > 4 or sizes["padding"] > 1
    with pytest.raises(VerificationError):
        prove(broken, configuration(conv, counterexample.sizes))


def test_broken_conv_dw_without_dilation_is_refuted():
    crop = conv.gradients[1].cases[0].tree.a
    broken = with_gradient(conv, "dw", CorrelateWeights(crop, dout))
    counterexample = refutation(broken, "dw")
    assert counterexample.sizes["stride"] >= 2
    confirm_numerically(conv, broken, "dw", counterexample,
                        lambda a, u, c: generated_conv(a, u, c)["dw"])  # fmt: skip


def test_wrong_pooling_divisor_is_refuted_where_it_matters():
    scaled = pointwise(sympy.Symbol("dout") / SIZE, dout=dout)  # 1/k instead of 1/k^2
    broken = with_gradient(avgpool, "dx", ScatterWindows(scaled, SIZE, STRIDE, PH, PW))
    counterexample = refutation(broken, "dx")
    assert counterexample.sizes["size"] >= 2  # at k = 1 both divisors are 1
    confirm_numerically(avgpool, broken, "dx", counterexample, generated_avgpool)


def test_kron_form_used_for_a_stride_other_than_the_size_is_refuted():
    scaled = pointwise(sympy.Symbol("dout") / SIZE**2, dout=dout)
    broken = with_gradient(avgpool, "dx", Crop(Upsample(scaled, 2), 0, 0, PH, PW))
    counterexample = refutation(broken, "dx")
    confirm_numerically(avgpool, broken, "dx", counterexample, generated_avgpool)


def generated_maxpool(arrays, upstream, config):
    module = importlib.import_module("generated.maxpool2d")
    _, cache = module.forward(arrays["x"], size=config[SIZE], stride=config[STRIDE])
    return module.backward(upstream, cache)


def test_max_pooling_routed_one_row_off_is_refuted():
    maxpool = LAYERS["maxpool2d"]
    routed = RouteToArgmax(dout, Operand("argmax"), SIZE, STRIDE, PH + 1, PW)
    broken = with_gradient(maxpool, "dx", Crop(routed, 1, 0, PH, PW))
    counterexample = refutation(broken, "dx")
    # The prover's values name the indicator array; numbers have no ties, so it is 1 at the
    # largest element of each window: put those in before comparing with the code.
    rng = np.random.default_rng(0)
    config = configuration(maxpool, counterexample.sizes)
    values = rng.standard_normal(maxpool.shapes(config)["x"])
    module = importlib.import_module("generated.maxpool2d")
    out, cache = module.forward(values, size=config[SIZE], stride=config[STRIDE])
    upstream = rng.standard_normal(out.shape)
    correct = module.backward(upstream, cache)
    evaluator = Evaluator({"x": values.astype(object)}, config)
    for binding, node in maxpool.forward:
        evaluator.env[binding] = evaluator(node)
    evaluator.env["dout"] = upstream.astype(object)
    wrong = np.asarray(evaluator(broken.gradients[0].cases[0].tree), dtype=float)
    assert not np.allclose(correct, wrong)
    k, s = config[SIZE], config[STRIDE]

    def number(expr):
        replacements = {}
        for atom in sympy.sympify(expr).atoms(sympy.Indexed):
            index = tuple(int(i) for i in atom.indices)
            if str(atom.base.label) == "dout":
                replacements[atom] = upstream[index]
            else:  # first_max_x[n, i, j, c, u, v]
                n_, i_, j_, c_, u_, v_ = index
                window = values[n_, s * i_ : s * i_ + k, s * j_ : s * j_ + k, c_]
                replacements[atom] = float(np.argmax(window) == u_ * k + v_)
        return float(sympy.sympify(expr).xreplace(replacements))

    element = tuple(counterexample.element)
    assert number(counterexample.left) == pytest.approx(correct[element])
    assert number(counterexample.right) == pytest.approx(wrong[element])


def test_broken_dense_gradients_are_refuted():
    broken = with_gradient(dense, "db", Sum(dout, (1,)))  # summed over the wrong axis
    result = allsizes.prove_layer(broken)
    (statement,) = [s for s in result.statements if s.what.startswith("db")]
    assert statement.outcome.status == "refuted"
    # The transposes swapped: dx = W^T-shaped product reading w the wrong way round.
    broken = with_gradient(dense, "dw", MatMul(Transpose(x), pointwise("2*g", g=dout)))
    counterexample = refutation(broken, "dw")
    confirm_numerically(dense, broken, "dw", counterexample,
                        lambda a, u, c: generated_dense(a, u, c)["dw"])  # fmt: skip


_a, _da, _p, _y = sympy.symbols("a da p y", real=True)
_m = LAYERS["mse"].inputs[0].axes[0]  # the losses' batch size (a Dim)
_ops = {"a": Operand("out"), "da": Operand("da"), "z": Operand("z")}
BROKEN_POINTWISE = {
    "sigmoid": pointwise(_da * _a * (1 + _a), da=_ops["da"], a=_ops["a"]),
    "relu": pointwise(_da, da=_ops["da"]),  # the mask left out
    "tanh": pointwise(_da * (1 - _a), da=_ops["da"], a=_ops["a"]),
    "softmax": pointwise(_a * _da, da=_ops["da"], a=_ops["a"]),  # the row-sum term left out
    "bce": pointwise((_p - _y) / (_p * (1 - _p)), p=Operand("probs"), y=Operand("targets")),
    "bce_with_logits": pointwise((_p - _y) / _m, p=Operand("logits"), y=Operand("targets")),
    "softmax_cross_entropy": pointwise(
        (sympy.Symbol("s") - _y) / _m, s=Softmax(Operand("logits")), y=Operand("targets")
    ),  # the closed form for targets that sum to 1, used for any targets
    "mse": pointwise((_p - _y) / _m, p=Operand("pred"), y=Operand("targets")),
}


@pytest.mark.parametrize("name", list(BROKEN_POINTWISE))
def test_broken_pointwise_gradients_are_refuted_and_the_numbers_confirm_it(name):
    layer = LAYERS[name]
    (gradient,) = layer.gradients
    tree = BROKEN_POINTWISE[name]
    broken = with_gradient(layer, gradient.name, tree)
    (statement,) = allsizes.prove_layer(broken).statements
    assert statement.outcome.status == "refuted"
    example = statement.outcome.counterexample
    arrays = {k: np.array(v) for k, v in example.inputs.items()}
    # The correct gradient from the generated code, the broken one evaluated on the numbers.
    module = importlib.import_module(f"generated.{layer.module}")
    forward = getattr(module, f"{layer.prefix}forward")
    backward = getattr(module, f"{layer.prefix}backward")
    if layer.kind == "loss":
        _, cache = forward(*[arrays[i.name] for i in layer.inputs])
        correct = backward(cache)
    else:
        _, cache = forward(arrays["z"])
        correct = backward(arrays["da"], cache)
    config = configuration(layer, example.sizes)
    evaluator = Evaluator({k: v.astype(object) for k, v in arrays.items()}, config)
    for binding, node in layer.forward:
        evaluator.env[binding] = evaluator(node)
    wrong = np.asarray(evaluator(tree), dtype=float)
    assert float(example.left) == pytest.approx(correct[0, 0])
    assert float(example.right) == pytest.approx(wrong[0, 0])
    assert not np.isclose(correct[0, 0], wrong[0, 0])


N_, H_, W_, C_, KH_, KW_, O_ = sympy.symbols("N H W C KH KW O", integer=True, positive=True)
n_, i_, j_, o_, u_, v_, c_, h_, w_ = sympy.symbols("n i j o u v c h w", integer=True)
X_, W__, Z_, dX_, dZ_ = (sympy.IndexedBase(s) for s in ("X", "W", "Z", "dX", "dZ"))
SHAPES = {
    "X": (N_, H_, W_, C_),
    "W": (KH_, KW_, C_, O_),
    "Z": (N_, H_ - KH_ + 1, W_ - KW_ + 1, O_),
}
LAYER = sum_over(X_[n_, i_ + u_, j_ + v_, c_] * W__[u_, v_, c_, o_], (c_, u_, v_), SHAPES)


def judge(kernel_read, extra=0):
    """Deliver 2's example: Z[n,i,j,o] = sum[c,u,v](X[n, i+u, j+v, c] * W[u,v,c,o]) and a
    claim dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * kernel_read) (+ extra)."""
    shapes = dict(SHAPES, dZ=SHAPES["Z"])
    claim = sum_over(dZ_[n_, i_, j_, o_] * kernel_read, (i_, j_, o_), shapes) + extra
    return check_gradient(
        Z_[n_, i_, j_, o_],
        LAYER,
        SHAPES,
        dX_[n_, h_, w_, c_],
        claim,
        context=[("ge", H_ - KH_), ("ge", W_ - KW_)],
    )


def test_check_gradient_proves_a_true_claim():
    assert judge(W__[h_ - i_, w_ - j_, c_, o_]).status == "proven"


def test_check_gradient_refutes_a_false_claim_with_a_counterexample_numpy_confirms():
    outcome = judge(W__[i_ - h_, j_ - w_, c_, o_])
    assert outcome.status == "refuted"
    example = outcome.counterexample
    assert example.sizes["KH"] + example.sizes["KW"] >= 3  # a 1x1 kernel cannot tell them apart
    # Numbers: the true gradient by finite differences of the layer in NumPy.
    sizes = {k: example.sizes[k] for k in ("N", "H", "W", "C", "KH", "KW", "O")}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sizes["N"], sizes["H"], sizes["W"], sizes["C"]))
    k = rng.standard_normal((sizes["KH"], sizes["KW"], sizes["C"], sizes["O"]))
    oh, ow = sizes["H"] - sizes["KH"] + 1, sizes["W"] - sizes["KW"] + 1
    dz = rng.standard_normal((sizes["N"], oh, ow, sizes["O"]))

    def loss(x_):
        z = np.zeros((sizes["N"], oh, ow, sizes["O"]))
        for i, j in np.ndindex(oh, ow):
            window = x_[:, i : i + sizes["KH"], j : j + sizes["KW"], :]
            z[:, i, j, :] = np.einsum("nuvc,uvco->no", window, k)
        return float(np.sum(z * dz))

    element = tuple(example.element)
    step = np.zeros_like(x)
    step[element] = 1e-6
    numeric = (loss(x + step) - loss(x - step)) / 2e-6  # exact up to rounding: loss is linear
    values = {"X": x, "W": k, "dZ": dz}

    def number(expr):
        return float(sympy.sympify(expr).xreplace({
            a: values[str(a.base.label)][tuple(int(t) for t in a.indices)]
            for a in sympy.sympify(expr).atoms(sympy.Indexed)
        }))  # fmt: skip

    assert number(example.left) == pytest.approx(numeric, abs=1e-6)
    assert not np.isclose(number(example.right), numeric)


def test_check_gradient_refutes_a_claim_that_agrees_on_every_small_size():
    """An extra term that reads W four rows away from the true one: zero unless the input
    has at least 5 rows, so it agrees with the true gradient on every size up to 4 (all the
    sweep uses), and refuted here at such a size."""
    extra = sum_over(dZ_[n_, i_, j_, o_] * W__[h_ - i_ + 4, w_ - j_, c_, o_], (i_, j_, o_),
                     dict(SHAPES, dZ=SHAPES["Z"]))  # fmt: skip
    outcome = judge(W__[h_ - i_, w_ - j_, c_, o_], extra)
    assert outcome.status == "refuted"
    sizes = outcome.counterexample.sizes
    assert max(sizes["H"], sizes["W"]) >= 5


def test_check_gradient_names_bad_input():
    with pytest.raises(ClaimError, match="no range"):
        sum_over(dZ_[n_, i_ + 1, j_, o_], (i_,), dict(SHAPES, dZ=SHAPES["Z"]))
    with pytest.raises(ClaimError, match="unknown array"):
        sum_over(sympy.IndexedBase("Q")[i_], (i_,), SHAPES)
    with pytest.raises(ClaimError, match="not affine"):
        judge(W__[h_ * i_, w_ - j_, c_, o_])


# ---------------------------------------------------------------------------
# Derivations: the general steps, for every size, before the worked example
# ---------------------------------------------------------------------------


def test_conv2d_derivation_shows_the_general_index_steps_before_the_example():
    from derive.report import derivation, to_text

    text = to_text(derivation(conv, conv.example))
    general = text.index("From the chain rule to the closed form, for every size")
    example = text.index("3. Element by element")
    assert text.index("2. Chain rule") < general < example
    steps = text[general:example]
    for sign in (
        "1[si + u = h + p]",  # the scatter sum
        "u = h + p - si",  # the constraint solved for the kernel index
        "W[h+p-si, w+p-sj, c, o]",
        "D = dilate_s(δ)",  # the renamings
        "R = rot180(W)",
        "full_convolve(D, R)",
        "crop of p rows and columns",  # the ranges that become the padding
        "crop_(p,p)^(H × W)(full_convolve(dilate_s(δ), rot180(W)))",
    ):
        assert sign in steps, sign


@pytest.mark.parametrize("what", list(BROKEN_CONV_DX))
def test_the_symbolic_stride_proof_is_not_fooled_by_broken_forms(what):
    """With the stride factored out, a broken form is never proven (its refutation is left
    to the fixed strides, whose counterexamples are exact)."""
    broken = with_gradient(conv, "dx", BROKEN_CONV_DX[what])
    statements = allsizes._index_set_statements(broken, {}, symbolic_stride=True)
    (dx,) = [s for s in statements if s.what.startswith("dx")]
    assert dx.outcome.status != "proven"
    assert all(s.outcome.status == "proven" for s in statements if s is not dx)


def test_broken_pooling_forms_are_not_proven_for_a_symbolic_stride():
    scaled = pointwise(sympy.Symbol("dout") / SIZE, dout=dout)
    broken = with_gradient(avgpool, "dx", ScatterWindows(scaled, SIZE, STRIDE, PH, PW))
    statements = allsizes._index_set_statements(broken, {}, symbolic_stride=True)
    assert [s.outcome.status for s in statements if s.what.startswith("dx")] != ["proven"]


# ---------------------------------------------------------------------------
# cnnderive check: a claimed gradient of an equation layer, judged for all sizes
# ---------------------------------------------------------------------------

CONV = "Z[n,i,j,o] = sum[c,u,v](X[n, i+u, j+v, c] * W[u,v,c,o])"
TRUE_DX = "dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * W[h-i, w-j, c, o])"


def run_check(claim, capsys, *more):
    from cnnderive.cli import main

    code = main(["check", "--equation", CONV, "--claim", claim, *more])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def conv_gradient_by_finite_differences(x, k, dz):
    """d/dX of sum(Z * dZ) for Z = the equation's valid correlation (linear in X)."""
    kh, kw = k.shape[:2]
    oh, ow = dz.shape[1:3]

    def loss(x_):
        z = np.zeros(dz.shape)
        for i, j in np.ndindex(oh, ow):
            z[:, i, j, :] = np.einsum("nuvc,uvco->no", x_[:, i : i + kh, j : j + kw, :], k)
        return float(np.sum(z * dz))

    gradient = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = 1e-6
        gradient[index] = (loss(x + step) - loss(x - step)) / 2e-6
    return gradient


def evaluated(text, arrays):
    expr = sympy.sympify(text, locals={name: sympy.IndexedBase(name) for name in arrays})
    return float(
        expr.xreplace(
            {
                a: arrays[str(a.base.label)][tuple(int(t) for t in a.indices)]
                for a in expr.atoms(sympy.Indexed)
            }  # fmt: skip
        )
    )


def test_check_proves_the_true_claim(capsys):
    code, out, _ = run_check(TRUE_DX, capsys)
    assert code == 0 and out.startswith("proven: dX[n,h,w,c] is the gradient for all sizes")


@pytest.mark.parametrize(
    "claim",
    [
        "dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * W[i-h, j-w, c, o])",  # the false claim
        # Right on every input of at most 4 rows (all a sweep of small sizes uses): the
        # extra term reads dZ four rows down, which only inputs of 5 rows or more have.
        TRUE_DX + " + sum[i,j,o](dZ[n,i,j,o] * W[h-i+4, w-j, c, o])",
    ],
    ids=["flipped kernel", "agrees on every size up to 4"],
)
def test_check_refutes_false_claims_with_a_counterexample_numpy_confirms(claim, capsys):
    import json

    code, out, _ = run_check(claim, capsys, "--json")
    verdict = json.loads(out)
    assert code == 1 and verdict["status"] == "refuted"
    sizes = verdict["sizes"]
    if "+4" in claim:
        assert sizes["X"][1] >= 5
    rng = np.random.default_rng(2)
    x = rng.standard_normal(sizes["X"])
    k = rng.standard_normal(sizes["W"])
    out_shape = (sizes["X"][0], sizes["X"][1] - sizes["W"][0] + 1,
                 sizes["X"][2] - sizes["W"][1] + 1, sizes["W"][3])  # fmt: skip
    dz = rng.standard_normal(out_shape)
    truth = conv_gradient_by_finite_differences(x, k, dz)
    element = tuple(verdict["counterexample"]["element"])
    arrays = {"X": x, "W": k, "dZ": dz}
    derived = evaluated(verdict["counterexample"]["derived"], arrays)
    claimed = evaluated(verdict["counterexample"]["claimed"], arrays)
    assert derived == pytest.approx(truth[element], abs=1e-6)
    assert not np.isclose(claimed, truth[element])


def test_check_says_where_it_fails_in_words(capsys):
    code, out, _ = run_check("dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * W[i-h, j-w, c, o])", capsys)
    assert code == 1
    assert (
        "refuted: dX[n,h,w,c] is not the gradient. Smallest sizes where it fails: X.shape = ("
        in out
    )
    assert "the chain rule gives" in out and "the claim gives" in out


@pytest.mark.parametrize(
    "claim, message",
    [
        ("dQ[n] = 1", "write d and an array of the equation: dX, dW"),
        ("dX[n,h,w] = 0", "dX has 3 indices but X has 4 axes"),
        ("dX[n,h,w,c] = sum[i](dZ[n,i+1,0,0])", "index i has no range"),
        ("dX[n,h,w,c] = Q[n]", "unknown array Q"),
        ("dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * W[h*i, w-j, c, o])", "not affine"),
    ],
)
def test_check_bad_input_is_one_line_and_exit_code_2(claim, message, capsys):
    code, _, err = run_check(claim, capsys)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
