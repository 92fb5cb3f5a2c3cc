"""The catalogue: every layer's definition, forward pass and gradients, written once.

Reading guide for one entry (conv2d):
  * ``definition`` is the forward pass in index notation, the layer's meaning;
  * ``forward`` is the same pass as a tree of array primitives (proven equal to it);
  * ``gradients`` are the closed forms, one tree per gradient (proven equal to
    what SymPy derives from the definition by the chain rule);
  * ``requirements`` are what valid sizes satisfy (used for error messages);
  * ``configurations`` is the sweep the proofs run on.

Adding a layer whose gradient composes existing primitives means adding an
entry here and nothing anywhere else.
"""

from __future__ import annotations

import itertools

import numpy as np
import sympy
from sympy import IndexedBase, exp, log

from derive.equation.layer import derived_closed_forms
from derive.functions import flush_subnormal, sigmoid, softplus
from derive.ir import (
    Case,
    Dim,
    Flatten,
    LogSumExp,
    Operand,
    Pad,
    Param,
    Pointwise,
    ReshapeLike,
    Softmax,
    Sum,
    WindowArgmax,
    pointwise,
)
from derive.layer import (
    CustomDefinition,
    Gradient,
    IndexDefinition,
    Input,
    Layer,
    Requirement,
    RuntimeParam,
)

# Index symbols of the definitions (0-based, like the code).
n, i, j, k, c, o, u, v, d, e = sympy.symbols("n i j k c o u v d e", integer=True, nonnegative=True)

x, w, b, dout = Operand("x"), Operand("w"), Operand("b"), Operand("dout")

STRIDE = Param("stride", "s")
PADDING = Param("padding", "p")
SIZE = Param("size", "k")


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------

_N = Dim("batch", "x", 0, "m")
_H = Dim("in_height", "x", 1, "H")
_W = Dim("in_width", "x", 2, "W")
_C = Dim("in_channels", "x", 3, r"C_{\mathrm{in}}")
_KH = Dim("kernel_height", "w", 0, "K_H")
_KW = Dim("kernel_width", "w", 1, "K_W")
_CO = Dim("out_channels", "w", 3, r"C_{\mathrm{out}}")
_OH = Dim("out_height", "dout", 1, "H'")
_OW = Dim("out_width", "dout", 2, "W'")

_X, _Xp, _Wt, _B, _Z = (IndexedBase(s) for s in ("X", r"\tilde{X}", "W", "b", "Z"))


def _zero_padded(a, padding):
    """X~ of the definition, element by element: X~[n,h,w,c] = X[n,h-p,w-p,c] where that
    element exists, else 0.  (Written here, not borrowed from derive.symbolic, whose Pad
    this definition is the check of.)"""
    n_, h_, w_, c_ = a.shape
    out = np.empty((n_, h_ + 2 * padding, w_ + 2 * padding, c_), dtype=object)
    for index in np.ndindex(*out.shape):
        batch, row, column, channel = index
        inside = padding <= row < h_ + padding and padding <= column < w_ + padding
        out[index] = a[batch, row - padding, column - padding, channel] if inside else sympy.S.Zero
    return out


def _conv_configurations():
    configs = []
    sizes = [(3, 3), (4, 4), (3, 4)]
    kernels = [(1, 1), (2, 2), (3, 3), (2, 3)]
    for (h, wd), (kh, kw), s, p, cin, cout, m in itertools.product(
        sizes, kernels, (1, 2), (0, 1), (1, 2), (1, 2), (1, 2)
    ):
        if kh > h + 2 * p or kw > wd + 2 * p:
            continue
        configs.append(
            {_N: m, _H: h, _W: wd, _C: cin, _KH: kh, _KW: kw, _CO: cout, STRIDE: s, PADDING: p}
        )
    return configs


# The closed forms are not written here: the derivation finds them from the equation
# (derive/equation), and derive.verify proves them against the definition below.
_conv_forward, _conv_gradients = derived_closed_forms(
    "Z[n,i,j,o] = b[o] + sum[c,u,v](pad(x, 0, p, p, 0)[n, s*i+u, s*j+v, c] * w[u,v,c,o])",
    parameters={"s": STRIDE, "p": PADDING},
    dims={"x": (_N, _H, _W, _C), "w": (_KH, _KW, _C, _CO), "b": (_CO,)},
    order=("x", "w", "b"),
)

conv2d = Layer(
    name="conv2d",
    title="2-D convolution (multi-channel, batch, stride, zero padding, bias)",
    kind="layer",
    module="conv2d",
    prefix="",
    inputs=(
        Input("x", (_N, _H, _W, _C), "X", "input images, NHWC"),
        Input("w", (_KH, _KW, _C, _CO), "W", "kernels (KH, KW, C_in, C_out)"),
        Input("b", (_CO,), "b", "biases (C_out,)"),
    ),
    params=(
        RuntimeParam(STRIDE, 1, "step between neighbouring windows"),
        RuntimeParam(PADDING, 0, "zeros added on every side of the input"),
    ),
    output="out",
    output_latex="Z",
    definition=IndexDefinition(
        lhs=_Z[n, i, j, o],
        rhs=_B[o]
        + sympy.Sum(
            _Xp[n, STRIDE * i + u, STRIDE * j + v, c] * _Wt[u, v, c, o],
            (c, 0, _C - 1),
            (u, 0, _KH - 1),
            (v, 0, _KW - 1),
        ),
        indices=(n, i, j, o),
        arrays=lambda a, sizes: {
            r"\tilde{X}": _zero_padded(a["x"], sizes[PADDING]),
            "W": a["w"],
            "b": a["b"],
        },
        meanings={r"\tilde{X}": Pad(x, PADDING, PADDING)},
        auxiliary=(
            r"\tilde{X}_{n,h,w,c} = \begin{cases} X_{n,h-p,w-p,c} & \text{if } p \le h < H + p,\ p \le w < W + p \\"
            r" 0 & \text{otherwise} \end{cases}",
            r"H' = \left\lfloor \frac{H + 2p - K_H}{s} \right\rfloor + 1,\qquad"
            r" W' = \left\lfloor \frac{W + 2p - K_W}{s} \right\rfloor + 1",
        ),
    ),
    forward=_conv_forward,
    gradients=_conv_gradients,
    requirements=(
        Requirement(sympy.Ge(STRIDE, 1), "stride must be at least 1, got {stride}"),
        Requirement(sympy.Ge(PADDING, 0), "padding must be at least 0, got {padding}"),
        Requirement(
            sympy.And(sympy.Le(_KH, _H + 2 * PADDING), sympy.Le(_KW, _W + 2 * PADDING)),
            "kernel {kernel_height}x{kernel_width} is larger than the padded input "
            "{in_height + 2*padding}x{in_width + 2*padding}; use a kernel of at most that size or more padding",
        ),
    ),
    configurations=_conv_configurations,
    example={_N: 1, _H: 3, _W: 3, _C: 1, _KH: 2, _KW: 2, _CO: 1, STRIDE: 1, PADDING: 0},
    seed_size={_N: 1, _H: 28, _W: 28, _C: 1, _KH: 9, _KW: 9, _CO: 20, STRIDE: 1, PADDING: 0},
    chain_rule=(
        r"\frac{\partial L}{\partial W_{u,v,c,o}} = \sum_{n,i,j} \frac{\partial L}{\partial Z_{n,i,j,o}}"
        r" \frac{\partial Z_{n,i,j,o}}{\partial W_{u,v,c,o}} = \sum_{n,i,j} \delta_{n,i,j,o}\,"
        r"\tilde{X}_{n,si+u,sj+v,c}",
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{i,j,o} \delta_{n,i,j,o}\,"
        r"\frac{\partial Z_{n,i,j,o}}{\partial X_{n,h,w,c}} = \sum_{o}\ \sum_{\substack{i,u:\ si+u=h+p\\ j,v:\ sj+v=w+p}}"
        r" \delta_{n,i,j,o}\, W_{u,v,c,o}",
        r"\frac{\partial L}{\partial b_{o}} = \sum_{n,i,j} \delta_{n,i,j,o}",
    ),
    notes=(
        "Indices are 0-based. 'correlate' slides the kernel without flipping it, as deep-learning "
        "frameworks do; 'full_convolve' is the same product over the gradient padded by $K - 1$ on "
        "every side, and the flip is written explicitly as rot180.",
        "For stride $s > 1$ the gradient is first dilated: $s - 1$ zeros between neighbouring elements.",
        "crop takes a window of an array and reads zeros beyond its edges: input rows that no "
        "window reaches get zero gradient.",
    ),
)


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------

_PN = Dim("batch", "x", 0, "m")
_PH = Dim("in_height", "x", 1, "H")
_PW = Dim("in_width", "x", 2, "W")
_PC = Dim("channels", "x", 3, "C")
_P = IndexedBase("P")


def _pool_configurations():
    configs = []
    for (h, wd), size, stride, ch, m in itertools.product(
        [(2, 2), (3, 3), (4, 4), (5, 5), (4, 5)], (1, 2, 3), (1, 2, 3), (1, 2), (1, 2)
    ):
        if size > h or size > wd:
            continue
        configs.append({_PN: m, _PH: h, _PW: wd, _PC: ch, SIZE: size, STRIDE: stride})
    return configs


_pool_inputs = (Input("x", (_PN, _PH, _PW, _PC), "X", "input, NHWC"),)
_pool_params = (
    RuntimeParam(SIZE, 2, "window height and width"),
    RuntimeParam(
        STRIDE, None, "step between windows (default: the window size)", default_from=SIZE
    ),
)
_pool_requirements = (
    Requirement(sympy.Ge(SIZE, 1), "pool size must be at least 1, got {size}"),
    Requirement(sympy.Ge(STRIDE, 1), "pool stride must be at least 1, got {stride}"),
    Requirement(
        sympy.And(sympy.Le(SIZE, _PH), sympy.Le(SIZE, _PW)),
        "pool window {size}x{size} does not fit the input {in_height}x{in_width}; use size at most "
        "{Min(in_height, in_width)}",
    ),
)
_pool_example = {_PN: 1, _PH: 4, _PW: 4, _PC: 1, SIZE: 2, STRIDE: 2}

_avgpool_forward, _avgpool_gradients = derived_closed_forms(
    "P[n,i,j,c] = mean[u<k, v<k](x[n, s*i+u, s*j+v, c])",
    parameters={"s": STRIDE, "k": SIZE},
    dims={"x": (_PN, _PH, _PW, _PC)},
    order=("x",),
)


# flush: a quarter of a window of small sigmoid outputs can fall below the smallest normal
# float (derive.functions.flush_subnormal: the identity in the proof's exact arithmetic).
def _flushed(tree):
    """``flush_subnormal`` inside the elementwise ``tree``'s expression, so that the flush
    runs on the array that expression writes, not on a copy."""
    if not isinstance(tree, Pointwise):
        raise TypeError(f"the derived average pool's forward is no longer elementwise: {tree}")
    return Pointwise(flush_subnormal(tree.expr), tree.arguments)


_avgpool_forward = tuple((name, _flushed(tree)) for name, tree in _avgpool_forward)

_FLUSH_NOTE = (
    "$\\operatorname{flush}(x) = x$: in exact arithmetic, where the proof works, it changes "
    "nothing. The code sets every subnormal value of $x$ (nonzero and smaller in magnitude than "
    "the smallest normal float, 1.2e-38 in float32) to 0, an absolute change below that bound. "
    "Saturated exponentials (sigmoid, softmax) make such values, and so does averaging small "
    "ones; arithmetic on them is slow on many CPUs."
)

avgpool2d = Layer(
    name="avgpool2d",
    title="2-D average pooling",
    kind="layer",
    module="avgpool2d",
    prefix="",
    inputs=_pool_inputs,
    params=_pool_params,
    output="out",
    output_latex="P",
    definition=IndexDefinition(
        lhs=_P[n, i, j, c],
        rhs=sympy.Sum(_X[n, STRIDE * i + u, STRIDE * j + v, c], (u, 0, SIZE - 1), (v, 0, SIZE - 1))
        / SIZE**2,
        indices=(n, i, j, c),
        arrays=lambda a, sizes: {"X": a["x"]},
    ),
    forward=_avgpool_forward,
    gradients=_avgpool_gradients,
    requirements=_pool_requirements,
    configurations=_pool_configurations,
    example=_pool_example,
    chain_rule=(
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{i,j} \delta_{n,i,j,c}\,"
        r"\frac{\partial P_{n,i,j,c}}{\partial X_{n,h,w,c}} = \frac{1}{k^2}"
        r" \sum_{\substack{i,u:\ si+u=h\\ j,v:\ sj+v=w}} \delta_{n,i,j,c}",
    ),
    notes=(
        _FLUSH_NOTE,
        "With stride = size the windows tile the input, every input element lies in at most one "
        "window, and the scatter-add is the Kronecker product with a k-by-k block of ones.",
        "Rows and columns that no window reaches get zero gradient: the last $(H - k) \\bmod s$ "
        "rows (and likewise columns), and the gaps between windows when $s > k$; crop reads "
        "zeros beyond the spread gradient's edge.",
    ),
)


class first_max_indicator(sympy.Function):
    """1 if window element ``position`` is the first maximum of ``values`` in row-major
    order, else 0.  It is the tie rule of max pooling written as a function: it evaluates
    once the values are numbers, and its derivative is 0, since the indicator is constant
    wherever the pooling is differentiable (away from ties); at a tie, the rule picks
    which element's derivative is taken."""

    @classmethod
    def eval(cls, position, *values):
        if all(value.is_number for value in values):
            # The first maximum: the first position holding the largest value.  Written
            # here, not borrowed from derive.symbolic, whose WindowArgmax this checks.
            first = list(values).index(max(values))
            return sympy.S.One if int(position) == first else sympy.S.Zero
        return None

    def fdiff(self, argindex=1):
        return sympy.S.Zero

    def _latex(self, printer, exp=None):
        return r"\mathbf{1}^{\mathrm{first\,max}}_{%s}" % printer._print(self.args[0])


# 1 at the first maximum (u, v) of window (n, i, j, c), else 0.
_FIRST_MAX = IndexedBase(r"\mathbf{1}^{\mathrm{first\,max}}")


def _first_max_definition(inputs, sizes):
    """P = sum over the window of element * indicator(element is the first maximum), for
    every window that lies inside the input."""
    a = inputs["x"]
    size, stride = sizes[SIZE], sizes[STRIDE]
    n_, h_, w_, c_ = a.shape
    shape = (n_, (h_ - size) // stride + 1, (w_ - size) // stride + 1, c_)
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        m_, i_, j_, c_ = index
        window = [
            a[m_, stride * i_ + p, stride * j_ + q, c_] for p in range(size) for q in range(size)
        ]
        out[index] = sympy.Add(
            *[
                value * first_max_indicator(position, *window)
                for position, value in enumerate(window)
            ]
        )
    return out


def _pool_samples(shapes, rng):
    """Small integers, so that windows tie often (as they do on MNIST after ReLU)."""
    return {"x": rng.integers(0, 3, size=shapes["x"]).astype(object)}


_maxpool_forward, _maxpool_gradients = derived_closed_forms(
    "P[n,i,j,c] = max[u<k, v<k](x[n, s*i+u, s*j+v, c])",
    parameters={"s": STRIDE, "k": SIZE},
    dims={"x": (_PN, _PH, _PW, _PC)},
    order=("x",),
)

maxpool2d = Layer(
    name="maxpool2d",
    title="2-D max pooling (ties go to the first maximum in row-major window order)",
    kind="layer",
    module="maxpool2d",
    prefix="",
    inputs=_pool_inputs,
    params=_pool_params,
    output="out",
    output_latex="P",
    definition=CustomDefinition(
        latex_lines=(
            r"P_{n,i,j,c} = \sum_{u=0}^{k-1} \sum_{v=0}^{k-1} X_{n,\,si+u,\,sj+v,\,c}\;"
            r"\mathbf{1}^{\mathrm{first\,max}}_{u,v}",
            r"\mathbf{1}^{\mathrm{first\,max}}_{u,v} = \begin{cases} 1 & \text{if } (u, v) = (u^*, v^*) \\ 0 & "
            r"\text{otherwise} \end{cases}",
            r"(u^*, v^*) = \text{the first } (u, v) \text{ in row-major order with } "
            r"X_{n,si+u,sj+v,c} = \max_{0 \le u',v' < k} X_{n,si+u',sj+v',c}",
        ),
        build=_first_max_definition,
        index_form=sympy.Sum(
            _X[n, STRIDE * i + u, STRIDE * j + v, c] * _FIRST_MAX[n, i, j, c, u, v],
            (u, 0, SIZE - 1),
            (v, 0, SIZE - 1),
        ),
        indices=(n, i, j, c),
        indicators={_FIRST_MAX.name: WindowArgmax(x, SIZE, STRIDE)},
    ),
    forward=_maxpool_forward,
    gradients=_maxpool_gradients,
    requirements=_pool_requirements,
    configurations=_pool_configurations,
    example=_pool_example,
    samples=_pool_samples,
    chain_rule=(
        r"\frac{\partial L}{\partial X_{n,h,w,c}} = \sum_{i,j} \delta_{n,i,j,c}\,"
        r"\mathbf{1}\left[(h, w) = (si+u^*_{n,i,j,c},\ sj+v^*_{n,i,j,c})\right]",
    ),
    notes=(
        "Tie rule: the gradient of a window goes to its first maximum in row-major order "
        "(as PyTorch does). Where a window's maximum is unique, the maximum is differentiable and "
        "this is its gradient; where several elements tie, it has no derivative, and the rule picks "
        "one of its subgradients. The definition writes the pooling as a sum of each window "
        "element times the indicator of being that first maximum, and SymPy differentiates it "
        "with the indicator held fixed: exactly the rule. The proof runs on integer inputs drawn "
        "from {0, 1, 2}, so most windows tie, and checks that the code follows the rule there too.",
        "SymPy's derivative of Max is a Heaviside step that splits a tie half and half, which is "
        "not a rule a pooling layer can use; hence the explicit first-maximum definition.",
    ),
)


# ---------------------------------------------------------------------------
# Dense and flatten
# ---------------------------------------------------------------------------

_DN = Dim("batch", "x", 0, "m")
_DI = Dim("in_features", "x", 1, r"D_{\mathrm{in}}")
_DO = Dim("out_features", "w", 1, r"D_{\mathrm{out}}")

_dense_forward, _dense_gradients = derived_closed_forms(
    "Z[n,o] = b[o] + sum[d](x[n,d] * w[d,o])",
    parameters={},
    dims={"x": (_DN, _DI), "w": (_DI, _DO), "b": (_DO,)},
    order=("x", "w", "b"),
)

dense = Layer(
    name="dense",
    title="Dense (fully connected) layer with bias",
    kind="layer",
    module="dense",
    prefix="",
    inputs=(
        Input("x", (_DN, _DI), "X", "inputs (N, D_in)"),
        Input("w", (_DI, _DO), "W", "weights (D_in, D_out)"),
        Input("b", (_DO,), "b", "biases (D_out,)"),
    ),
    params=(),
    output="out",
    output_latex="Z",
    definition=IndexDefinition(
        lhs=_Z[n, o],
        rhs=_B[o] + sympy.Sum(_X[n, d] * _Wt[d, o], (d, 0, _DI - 1)),
        indices=(n, o),
        arrays=lambda a, sizes: {"X": a["x"], "W": a["w"], "b": a["b"]},
    ),
    forward=_dense_forward,
    gradients=_dense_gradients,
    requirements=(),
    configurations=lambda: [
        {_DN: m, _DI: di, _DO: do}
        for m, di, do in itertools.product((1, 2, 3), (1, 2, 3), (1, 2, 3))
    ],
    example={_DN: 2, _DI: 2, _DO: 2},
    seed_size={_DN: 1, _DI: 2000, _DO: 10},
    chain_rule=(
        r"\frac{\partial L}{\partial W_{d,o}} = \sum_{n} \delta_{n,o} \frac{\partial Z_{n,o}}{\partial W_{d,o}}"
        r" = \sum_n X_{n,d}\,\delta_{n,o}",
        r"\frac{\partial L}{\partial X_{n,d}} = \sum_{o} \delta_{n,o} W_{d,o}",
        r"\frac{\partial L}{\partial b_{o}} = \sum_{n} \delta_{n,o}",
    ),
)

_FN = Dim("batch", "x", 0, "m")
_FH = Dim("in_height", "x", 1, "H")
_FW = Dim("in_width", "x", 2, "W")
_FC = Dim("channels", "x", 3, "C")
_F = IndexedBase("F")

flatten = Layer(
    name="flatten",
    title="Flatten (N, H, W, C) to (N, H*W*C), row-major",
    kind="layer",
    module="flatten",
    prefix="",
    inputs=(Input("x", (_FN, _FH, _FW, _FC), "X", "input, NHWC"),),
    params=(),
    output="out",
    output_latex="F",
    definition=IndexDefinition(
        lhs=_F[n, e],
        rhs=_X[
            n, sympy.floor(e / (_FW * _FC)), sympy.Mod(sympy.floor(e / _FC), _FW), sympy.Mod(e, _FC)
        ],
        indices=(n, e),
        arrays=lambda a, sizes: {"X": a["x"]},
    ),
    forward=(("out", Flatten(x)),),
    gradients=(
        Gradient("dx", "x", (Case(ReshapeLike(dout, x), name="δ reshaped to the input's shape"),)),
    ),
    requirements=(),
    configurations=lambda: [
        {_FN: m, _FH: h, _FW: wd, _FC: ch}
        for m, h, wd, ch in itertools.product((1, 2), (1, 2, 3), (1, 2), (1, 2, 3))
    ],
    example={_FN: 1, _FH: 2, _FW: 2, _FC: 1},
    chain_rule=(r"\frac{\partial L}{\partial X_{n,i,j,c}} = \delta_{n,\,(iW + j)C + c}",),
)


# ---------------------------------------------------------------------------
# Activations (elementwise, except softmax over the last axis)
# ---------------------------------------------------------------------------

_AN = Dim("batch", "z", 0, "m")
_AK = Dim("features", "z", 1, "K")
_Zi, _A = IndexedBase("Z"), IndexedBase("A")
_z_input = (Input("z", (_AN, _AK), "Z", "pre-activations, any shape", any_rank=True),)
_da, _z, _a = Operand("da"), Operand("z"), Operand("out")


def _activation_configurations():
    return [{_AN: m, _AK: kk} for m, kk in ((1, 1), (1, 3), (2, 2))]


def _activation(
    name, title, textbook, forward_expr, backward_expr, backward_args, chain_rule, notes=()
):
    """An elementwise activation A = f(Z): ``textbook`` is f in terms of the Indexed Z,
    ``forward_expr`` the expression the code evaluates (in terms of the symbol z)."""
    return Layer(
        name=name,
        title=title,
        kind="activation",
        module="activations",
        prefix=f"{name}_",
        inputs=_z_input,
        params=(),
        output="out",
        output_latex="A",
        definition=IndexDefinition(
            lhs=_A[n, k],
            rhs=textbook(_Zi[n, k]),
            indices=(n, k),
            arrays=lambda a, sizes: {"Z": a["z"]},
        ),
        forward=(("out", pointwise(forward_expr, z=_z)),),
        gradients=(Gradient("dz", "z", (Case(pointwise(backward_expr, **backward_args)),)),),
        requirements=(),
        configurations=_activation_configurations,
        example={_AN: 1, _AK: 3},
        upstream="da",
        chain_rule=chain_rule,
        notes=notes,
    )


_zs, _das, _as = sympy.symbols("z da a", real=True)

sigmoid_layer = _activation(
    "sigmoid",
    "Sigmoid",
    lambda z_: 1 / (1 + exp(-z_)),
    # Saturated, sigmoid's values and its gradient's products fall below the smallest
    # normal float (a trained seed network's conv gradient held ~10,000 such values per
    # 256-image batch), and on many x86 CPUs arithmetic on them is tens of times slower.
    # flush(x) is x in the proof's exact arithmetic and sets those values to 0 in the code.
    flush_subnormal(sigmoid(_zs)),
    flush_subnormal(_das * _as * (1 - _as)),
    {"da": _da, "a": _a},
    (
        r"\frac{\partial L}{\partial Z_{n,k}} = \delta_{n,k}\,\frac{e^{-Z_{n,k}}}{(1+e^{-Z_{n,k}})^2}"
        r" = \delta_{n,k}\,A_{n,k}\,(1 - A_{n,k})",
    ),
    notes=(_FLUSH_NOTE,),
)

relu = _activation(
    "relu",
    "ReLU",
    lambda z_: sympy.Piecewise((z_, z_ > 0), (0, True)),
    sympy.Max(_zs, 0),
    sympy.Piecewise((_das, _zs > 0), (0, True)),
    {"da": _da, "z": _z},
    (r"\frac{\partial L}{\partial Z_{n,k}} = \delta_{n,k}\,\mathbf{1}[Z_{n,k} > 0]",),
    notes=(
        "ReLU has no derivative at $Z = 0$; the gradient uses 0 there (a subgradient, any value "
        "in $[0, 1]$ would be one), which is what the strict $Z > 0$ in the definition gives.",
    ),
)

tanh = _activation(
    "tanh",
    "Hyperbolic tangent",
    sympy.tanh,
    sympy.tanh(_zs),
    _das * (1 - _as**2),
    {"da": _da, "a": _a},
    (r"\frac{\partial L}{\partial Z_{n,k}} = \delta_{n,k}\,(1 - A_{n,k}^2)",),
)

_ss = sympy.Symbol("weighted_sum", real=True)
softmax = Layer(
    name="softmax",
    title="Softmax over the last axis",
    kind="activation",
    module="activations",
    prefix="softmax_",
    inputs=(
        Input(
            "z", (_AN, _AK), "Z", "scores (..., K); softmax runs over the last axis", any_rank=True
        ),
    ),
    params=(),
    output="out",
    output_latex="A",
    definition=IndexDefinition(
        lhs=_A[n, k],
        rhs=exp(_Zi[n, k]) / sympy.Sum(exp(_Zi[n, j]), (j, 0, _AK - 1)),
        indices=(n, k),
        arrays=lambda a, sizes: {"Z": a["z"]},
    ),
    forward=(("out", Softmax(_z)),),
    gradients=(
        Gradient(
            "dz",
            "z",
            (
                Case(
                    pointwise(
                        _as * (_das - _ss),
                        a=_a,
                        da=_da,
                        weighted_sum=Sum(pointwise(_das * _as, da=_da, a=_a), (-1,), keepdims=True),
                    ),
                    name="the softmax Jacobian applied to δ",
                ),
            ),
        ),
    ),
    requirements=(),
    configurations=lambda: [
        {_AN: m, _AK: kk} for m, kk in ((1, 1), (1, 2), (1, 3), (2, 3), (1, 4))
    ],
    example={_AN: 1, _AK: 3},
    upstream="da",
    chain_rule=(
        r"\frac{\partial A_{n,j}}{\partial Z_{n,k}} = A_{n,j}\,(\mathbf{1}[j = k] - A_{n,k})",
        r"\frac{\partial L}{\partial Z_{n,k}} = \sum_j \delta_{n,j} A_{n,j} (\mathbf{1}[j=k] - A_{n,k})"
        r" = A_{n,k}\left(\delta_{n,k} - \sum_j \delta_{n,j} A_{n,j}\right)",
    ),
    notes=(
        "The generated forward subtracts each row's maximum before exponentiating; the shift cancels.",
    ),
)


# ---------------------------------------------------------------------------
# Losses: mean over the batch, summed over classes
# ---------------------------------------------------------------------------

_LN = Dim("batch", "targets", 0, "m")
_LK = Dim("classes", "targets", 1, "K")
_Y = IndexedBase("Y")
_L = sympy.Symbol("L")
_ps, _ys, _ts, _ls = sympy.symbols("p y total row_logsumexp", real=True)
_softmax_s, _target_sum = sympy.symbols("softmax target_sum", real=True)
_targets = Input(
    "targets", (_LN, _LK), "Y", "one-hot labels or probabilities (N, K)", differentiable=False
)


def _loss_configurations():
    return [{_LN: m, _LK: kk} for m, kk in ((1, 1), (1, 2), (2, 1), (2, 3))]


def _loss(
    name,
    title,
    input_name,
    input_latex,
    summand,
    forward_summand,
    forward_args,
    gradient,
    gradient_args,
    chain_rule,
    notes=(),
    open_interval=None,
    interval_advice="",
):
    """A loss L = (1/m) sum_{n,k} summand(P[n,k], Y[n,k]); ``forward_summand`` is the form the
    code evaluates (numerically stable), ``gradient`` the closed form of dL/dinput.
    ``open_interval``: the input's values must lie strictly inside it (see Input)."""
    inp = Operand(input_name)
    return Layer(
        name=name,
        title=title,
        kind="loss",
        module="losses",
        prefix=f"{name}_",
        inputs=(
            Input(
                input_name,
                (_LN, _LK),
                input_latex,
                f"{input_name} (N, K)",
                open_interval=open_interval,
                interval_advice=interval_advice,
            ),
            _targets,
        ),
        params=(),
        output="loss",
        output_latex="L",
        definition=IndexDefinition(
            lhs=_L,
            rhs=sympy.Sum(
                summand(IndexedBase(input_latex), _Y[n, k]), (n, 0, _LN - 1), (k, 0, _LK - 1)
            )
            / _LN,
            indices=(),
            arrays=lambda a, sizes: {input_latex: a[input_name], "Y": a["targets"]},
        ),
        forward=(
            (
                "loss",
                pointwise(
                    _ts / _LN,
                    total=Sum(
                        pointwise(
                            forward_summand,
                            **{kk: (inp if vv is None else vv) for kk, vv in forward_args.items()},
                        )
                    ),
                ),
            ),
        ),
        gradients=(
            Gradient(f"d{input_name}", input_name, (Case(pointwise(gradient, **gradient_args)),)),
        ),
        requirements=(),
        configurations=_loss_configurations,
        example={_LN: 3, _LK: 2},  # three examples: the 1/m shows (with 2, MSE's 2/m is 1)
        chain_rule=chain_rule,
        notes=notes,
    )


_y_op = Operand("targets")

bce = _loss(
    "bce",
    "Binary cross-entropy on probabilities",
    "probs",
    "P",
    lambda P, y_: -(y_ * log(P[n, k]) + (1 - y_) * log(1 - P[n, k])),
    -(_ys * log(_ps) + (1 - _ys) * log(1 - _ps)),
    {"p": None, "y": _y_op},
    (_ps - _ys) / (_ps * (1 - _ps) * _LN),
    {"p": Operand("probs"), "y": _y_op},
    (
        r"\frac{\partial L}{\partial P_{n,k}} = \frac{1}{m}\left(-\frac{Y_{n,k}}{P_{n,k}}"
        r" + \frac{1 - Y_{n,k}}{1 - P_{n,k}}\right) = \frac{P_{n,k} - Y_{n,k}}{m\,P_{n,k}(1 - P_{n,k})}",
    ),
    notes=(
        "Probabilities of exactly 0 or 1 give an infinite or undefined loss and gradient, "
        "so the generated code refuses them (and any value outside [0, 1]) with a "
        "ValueError; after a sigmoid, use bce_with_logits, which never evaluates log(0).",
    ),
    open_interval=(0, 1),
    interval_advice="after a sigmoid, use bce_with_logits on the logits instead",
)

bce_with_logits = _loss(
    "bce_with_logits",
    "Binary cross-entropy on logits (sigmoid + BCE fused)",
    "logits",
    "Z",
    lambda Z, y_: (
        -(y_ * log(1 / (1 + exp(-Z[n, k]))) + (1 - y_) * log(1 - 1 / (1 + exp(-Z[n, k]))))
    ),
    softplus(_ps) - _ys * _ps,
    {"p": None, "y": _y_op},
    flush_subnormal((sigmoid(_ps) - _ys) / _LN),
    {"p": Operand("logits"), "y": _y_op},
    (
        r"A = \sigma(Z),\quad \frac{\partial L}{\partial Z_{n,k}} = \frac{\partial L}{\partial A_{n,k}}"
        r"\frac{\partial A_{n,k}}{\partial Z_{n,k}} = \frac{A_{n,k} - Y_{n,k}}{m\,A_{n,k}(1-A_{n,k})}"
        r"\cdot A_{n,k}(1 - A_{n,k}) = \frac{A_{n,k} - Y_{n,k}}{m}",
    ),
    notes=(
        "The code evaluates softplus(z) - y z, equal to the textbook form and finite for any "
        "logit (softplus(z) = logaddexp(0, z)).",
        _FLUSH_NOTE,
    ),
)

softmax_cross_entropy = _loss(
    "softmax_cross_entropy",
    "Softmax cross-entropy on logits (softmax + CE fused)",
    "logits",
    "Z",
    lambda Z, y_: -y_ * log(exp(Z[n, k]) / sympy.Sum(exp(Z[n, j]), (j, 0, _LK - 1))),
    _ys * (_ls - _ps),
    {"p": None, "y": _y_op, "row_logsumexp": LogSumExp(Operand("logits"))},
    flush_subnormal((_softmax_s * _target_sum - _ys) / _LN),
    {
        "softmax": Softmax(Operand("logits")),
        "target_sum": Sum(_y_op, (-1,), keepdims=True),
        "y": _y_op,
    },
    (
        r"\frac{\partial L}{\partial Z_{n,k}} = -\frac{1}{m}\sum_j Y_{n,j}\,(\mathbf{1}[j=k] - A_{n,k})"
        r" = \frac{1}{m}\left(A_{n,k}\sum_j Y_{n,j} - Y_{n,k}\right),\qquad A = \operatorname{softmax}(Z)",
        r"\sum_j Y_{n,j} = 1 \implies \frac{\partial L}{\partial Z_{n,k}} = \frac{A_{n,k} - Y_{n,k}}{m}",
    ),
    notes=(
        "The closed form holds for any targets; for one-hot or probability targets "
        "(each row sums to 1) it is $(A - Y)/m$.",
        "The code evaluates y (logsumexp(z) - z), finite for any logits.",
        _FLUSH_NOTE,
    ),
)

mse = _loss(
    "mse",
    "Mean squared error",
    "pred",
    "P",
    lambda P, y_: (P[n, k] - y_) ** 2,
    (_ps - _ys) ** 2,
    {"p": None, "y": _y_op},
    2 * (_ps - _ys) / _LN,
    {"p": Operand("pred"), "y": _y_op},
    (r"\frac{\partial L}{\partial P_{n,k}} = \frac{2}{m}(P_{n,k} - Y_{n,k})",),
    notes=(
        "Squared errors are summed over outputs and averaged over the batch, without a factor 1/2.",
    ),
)


LAYERS: dict[str, Layer] = {
    layer.name: layer
    for layer in (
        conv2d,
        maxpool2d,
        avgpool2d,
        dense,
        flatten,
        sigmoid_layer,
        relu,
        tanh,
        softmax,
        bce,
        bce_with_logits,
        softmax_cross_entropy,
        mse,
    )
}
