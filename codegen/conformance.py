"""Conformance of the runtime library: every kernel against derive's definition of its primitive.

The proof (derive.verify) shows that each closed-form tree equals the chain-rule
derivative when the tree's primitives mean what derive/symbolic.py says they mean.
The code that runs calls the NumPy kernels of codegen/runtime/kernels.py instead; this module
checks that each of them computes what the SymPy interpreter computes for the same
primitive, on the same numbers:

* random float64 inputs (compared to within rounding) and tie-heavy small integers
  (compared exactly: sums of small integers are exact in any order, and the tie rule
  of window_argmax must pick the very same position);
* every code path of every kernel, each forced explicitly: the kernels' thresholds are
  set on a private copy of the module (``Check.settings``), and the check fails unless
  the path it names was taken (``Check.taken``) or avoided (``Check.avoided``);
* strides 1 to 3, a workspace kept between calls and filled with garbage in between
  (a kept array must be overwritten, not trusted).

``cnnderive generate`` runs every check before it writes anything and refuses to emit
code over a kernel that disagrees (``KernelConformanceError``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import sympy

from codegen.emit import KERNELS, WORKSPACE_KERNELS
from derive import ir
from derive.symbolic import Evaluator

KERNELS_SOURCE = Path(__file__).parent / "runtime" / "kernels.py"

# A large number for a threshold that must never be reached.
_NEVER = 1 << 60


class KernelConformanceError(RuntimeError):
    """A kernel of the runtime library disagrees with derive's definition of its primitive."""


@dataclass
class Check:
    """One call of one kernel, compared with the SymPy interpreter of ``node``.

    ``node`` is the primitive over ``Operand`` leaves named like the kernel's array
    parameters; ``arrays`` holds their numbers.  ``settings`` are module attributes of
    the kernels set for this check (thresholds, or a block size), ``taken`` the module
    functions the call must reach and ``avoided`` those it must not."""

    label: str
    node: ir.Node
    arrays: dict[str, np.ndarray]
    settings: dict[str, object] = field(default_factory=dict)
    taken: tuple[str, ...] = ()
    avoided: tuple[str, ...] = ()
    exact: bool = False


def load_kernels(source: Path = KERNELS_SOURCE, name: str = "kernels_under_test"):
    """A private copy of the kernels module: its thresholds can be set without touching
    the module that the generated layers import."""
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# The reference: derive's SymPy interpreter on numbers
# ---------------------------------------------------------------------------


def _as_objects(array: np.ndarray, prefix: str) -> np.ndarray:
    """Python numbers for the interpreter; a NaN becomes a symbol of its own, so that the
    reference tells which outputs it reaches."""
    out = np.empty(array.shape, dtype=object)
    for index in np.ndindex(*array.shape):
        value = array[index]
        if np.issubdtype(array.dtype, np.integer):
            out[index] = int(value)
        elif np.isnan(value):
            out[index] = sympy.Symbol(f"{prefix}_nan_{'_'.join(map(str, index))}")
        elif float(value).is_integer():
            out[index] = int(value)
        else:
            out[index] = float(value)
    return out


def reference(node: ir.Node, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The interpreter's value of ``node``: float64, NaN where a NaN input reaches."""
    env = {
        name: (array if np.issubdtype(array.dtype, np.integer) else _as_objects(array, name))
        for name, array in arrays.items()
    }
    value = np.asarray(Evaluator(env, {})(node))
    if value.dtype != object:
        return value
    out = np.empty(value.shape, dtype=np.float64)
    for index in np.ndindex(*value.shape):
        element = sympy.sympify(value[index])
        out[index] = np.nan if element.free_symbols else float(element)
    return out


def _window_argmax_reference(a: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Windows holding a NaN: the first NaN (NaN counts as the maximum, as in np.argmax);
    every other window: the interpreter's first maximum."""
    node = ir.WindowArgmax(ir.Operand("a"), size, stride)
    finite = np.where(np.isnan(a), 0.0, a)
    out = reference(node, {"a": finite}).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(1, 2))
    windows = windows[:, ::stride, ::stride].reshape(out.shape + (size * size,))
    for index in np.ndindex(*out.shape):
        nans = np.flatnonzero(np.isnan(windows[index]))
        if nans.size:
            out[index] = nans[0]
    return out


# ---------------------------------------------------------------------------
# Running one check
# ---------------------------------------------------------------------------


class _Watch:
    """Counts the calls of some module functions of a kernels copy, and the images per
    block of the blocked loops."""

    def __init__(self, module, names):
        self.module, self.calls, self.originals = module, {}, {}
        self.block_sizes: list[int] = []
        for name in names:
            if name == "math.gcd":
                original_math = module.math
                self.originals[name] = original_math
                self.calls[name] = 0

                def gcd(*args, _math=original_math):
                    self.calls["math.gcd"] += 1
                    return _math.gcd(*args)

                module.math = types.SimpleNamespace(**{**vars(math), "gcd": gcd})
                continue
            if not hasattr(module, name):
                raise KernelConformanceError(
                    f"codegen/runtime/kernels.py has no {name}: a fast path was renamed or removed; "
                    "update the checks in codegen/conformance.py to force and watch the new one"
                )
            original = getattr(module, name)
            self.originals[name] = original
            self.calls[name] = 0
            setattr(module, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            result = original(*args, **kwargs)
            if name == "_blocks":
                result = list(result)
                self.block_sizes += [stop - start for start, stop in result]
            return result

        return counted

    def restore(self):
        for name, original in self.originals.items():
            setattr(self.module, name.split(".")[0], original)


def kernel_name(node: ir.Node) -> str:
    """The kernel the emitter calls for ``node`` (a Sum over leading axes: sum_leading)."""
    return "sum_leading" if isinstance(node, ir.Sum) else KERNELS[type(node)]


def _kernel_arguments(node: ir.Node, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    """Keyword arguments of the kernel call, named after the node's fields (as emitted).
    The arrays are copies, so that a kernel that writes into its input shows."""
    if isinstance(node, ir.Sum):
        return {"a": arrays[node.a.name].copy(order="K"), "count": len(node.axes)}
    arguments = {}
    for item in fields(node):
        value = getattr(node, item.name)
        if isinstance(value, ir.Operand):
            arguments[item.name] = arrays[value.name].copy(order="K")
        else:
            arguments[item.name] = int(value)
    return arguments


def _spoil(workspace: dict) -> None:
    """Garbage in every kept array, so that a kernel that trusts old contents shows."""
    for kept in workspace.values():
        if isinstance(kept, np.ndarray) and kept.size:
            if kept.dtype.kind == "f":
                kept.fill(np.nan)
            elif kept.dtype.kind in "iu":
                kept.fill(7)
            elif kept.dtype.kind == "b":
                kept.fill(True)


def _difference(got, expected, exact: bool) -> str | None:
    """None if ``got`` matches ``expected`` (NaN where expected is NaN), else what differs."""
    got = np.asarray(got)
    if got.shape != expected.shape:
        return f"shape {got.shape}, the definition gives {expected.shape}"
    got64 = got.astype(np.float64) if got.dtype.kind in "fiu" else got
    if expected.dtype.kind in "iu" or exact:
        bad = ~((got64 == expected) | (np.isnan(got64) & np.isnan(expected)))
    else:
        scale = 1.0 + np.abs(np.nan_to_num(expected))
        close = np.abs(got64 - expected) <= 1e-11 * scale
        bad = ~(close | (np.isnan(got64) & np.isnan(expected)))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        return (
            f"element {list(index)} is {got64[index].item()!r}, the definition gives "
            f"{expected[index].item()!r} ({int(bad.sum())} of {bad.size} elements differ)"
        )
    return None


def _forget_kept_patches(module) -> None:
    """Forget the patch matrices the module's forward correlations kept for this thread:
    each check then unrolls its own input (the kept ones have a check of their own,
    _kept_patches_problems)."""
    module._remembered_patches().clear()


def _run(module, check: Check, expected: np.ndarray) -> list[str]:
    """Failures of one check: without a workspace, then twice with one (spoiled between)."""
    kernel = kernel_name(check.node)
    function = getattr(module, kernel)
    problems = []
    modes = ["no workspace"]
    if kernel in WORKSPACE_KERNELS:
        modes += ["workspace", "kept workspace"]
    workspace: dict = {}
    for mode in modes:
        _forget_kept_patches(module)
        arguments = _kernel_arguments(check.node, check.arrays)
        watch = _Watch(module, set(check.taken) | set(check.avoided))
        try:
            if mode == "no workspace":
                got = function(**arguments)
            else:
                if mode == "kept workspace":
                    _spoil(workspace)
                got = function(**arguments, workspace=workspace, key="check")
            got = np.array(got)  # a copy: a kept result is overwritten by the next call
        except Exception as error:  # a kernel that raises disagrees with the definition
            problems.append(f"{check.label} ({mode}): raised {type(error).__name__}: {error}")
            continue
        finally:
            watch.restore()
        difference = _difference(got, expected, check.exact)
        if difference:
            problems.append(f"{check.label} ({mode}): {difference}")
        for name, array in check.arrays.items():
            given = arguments.get(name)
            if isinstance(given, np.ndarray) and not np.array_equal(
                given, array, equal_nan=array.dtype.kind == "f"
            ):
                problems.append(f"{check.label} ({mode}): wrote into its argument {name}")
        problems += [f"{check.label} ({mode}): {p}" for p in _path_problems(check, watch)]
    return problems


def _path_problems(check: Check, watch: _Watch) -> list[str]:
    """Whether the call took the paths the check forces, and avoided the others."""
    problems = []
    for name in check.taken:
        if name == "_blocks" and "one-image blocks" in check.label:
            if len(watch.block_sizes) < 2 or max(watch.block_sizes) != 1:
                problems.append(f"not computed in one-image blocks ({watch.block_sizes})")
        elif name == "_blocks" and "blocks of two" in check.label:
            if sorted(set(watch.block_sizes)) != [1, 2]:
                problems.append(f"not computed in blocks of 2 and 1 ({watch.block_sizes})")
        elif not watch.calls.get(name):
            problems.append(f"the path through {name} was not taken")
    for name in check.avoided:
        if watch.calls.get(name):
            problems.append(f"took {name}, which it must avoid")
    return problems


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

BANDED = {"_BANDED_MIN_TAPS": 1}
# Narrow chunks: whole chunks of 3 (or 2) output columns and a shorter rest.
BANDED_NARROW = {"_BANDED_MIN_TAPS": 1, "_BAND_MIN_WIDTH": 3}
# im2col for every kernel, one channel or several.
IM2COL = {"_BANDED_MIN_TAPS": _NEVER, "_ROWS_MAX_WEIGHTS": 0}
# Row patches for every kernel of several channels.
ROWS = {"_ROWS_MAX_WEIGHTS": _NEVER}
ONE_IMAGE_BLOCKS = {"_BLOCK_BYTES": 1, "_BANDED_BLOCK_BYTES": 1, "_ROWS_BLOCK_BYTES": 1}


def _blocks_of_two(n, bytes_per_image, budget=None):
    return 2


BLOCKS_OF_TWO = {"_block_size": _blocks_of_two}


def _values(rng, shape, kind, dtype=np.float64):
    if kind == "ties":
        return rng.integers(-2, 3, size=shape).astype(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def _with_nan(rng, array):
    out = array.copy()
    flat = out.reshape(-1)
    flat[rng.integers(0, flat.size)] = np.nan
    return out


def _convolution_checks(rng) -> list[Check]:
    checks = []
    a, k, g = ir.Operand("a"), ir.Operand("kernel"), ir.Operand("g")
    paths = [
        ("shipped thresholds", {}, (), ()),
        ("banded", BANDED, ("_correlate_banded",), ()),
        ("banded, narrow chunks", BANDED_NARROW, ("_correlate_banded",), ()),
        ("im2col", IM2COL, (), ("_correlate_banded",)),
        ("im2col, one-image blocks", {**IM2COL, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("banded, one-image blocks", {**BANDED, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("im2col, blocks of two", {**IM2COL, **BLOCKS_OF_TWO}, ("_blocks",), ()),
        ("rows", ROWS, (), ()),
        ("rows, one-image blocks", {**ROWS, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("rows, blocks of two", {**ROWS, **BLOCKS_OF_TWO}, ("_blocks",), ()),
    ]
    for (kh, kw), stride, c_in, kind in itertools.product(
        [(1, 1), (2, 2), (3, 2), (3, 3)], (1, 2, 3), (1, 2), ("random", "ties")
    ):
        n, h, w, c_out = 3, 7, 8, 2
        arrays = {
            "a": _values(rng, (n, h, w, c_in), kind),
            "kernel": _values(rng, (kh, kw, c_in, c_out), kind),
        }
        for name, settings, taken, avoided in paths:
            banded = c_in == 1 and stride == 1
            if "banded" in name and not banded:
                taken, avoided = (
                    (t for t in taken if t != "_correlate_banded"),
                    ("_correlate_banded",),
                )
            if c_in > 1 and "im2col" in name:
                taken = tuple(taken) + ("_copy_window_rows",)
                avoided = tuple(avoided) + ("_correlate_rows",)
            if "rows" in name:
                if c_in > 1:
                    taken = tuple(taken) + ("_correlate_rows", "_channel_rows")
                else:  # one channel never takes the row patches
                    avoided = tuple(avoided) + ("_correlate_rows",)
            checks.append(
                Check(
                    f"correlate {kh}x{kw}x{c_in}x{c_out} stride {stride}, {kind} values, {name}",
                    ir.Correlate(a, k, stride),
                    arrays,
                    settings,
                    tuple(taken),
                    tuple(avoided),
                    exact=kind == "ties",
                )
            )
    # LeNet's first kernel shape under the shipped thresholds: the banded paths as they run.
    for kind in ("random", "ties"):
        arrays = {
            "a": _values(rng, (2, 9, 10, 1), kind),
            "kernel": _values(rng, (5, 5, 1, 6), kind),
        }
        checks.append(
            Check(
                f"correlate 5x5x1x6, {kind} values, shipped thresholds (banded)",
                ir.Correlate(a, k, 1),
                arrays,
                taken=("_correlate_banded",),
                exact=kind == "ties",
            )
        )
        arrays = {"a": _values(rng, (2, 9, 10, 1), kind), "g": _values(rng, (2, 5, 6, 6), kind)}
        checks.append(
            Check(
                f"correlate_weights 9x10x1 with 5x6x6, {kind} values, shipped thresholds (banded)",
                ir.CorrelateWeights(a, g),
                arrays,
                taken=("_correlate_weights_banded",),
                exact=kind == "ties",
            )
        )
    # NaN: the banded product would spread it through the band's zeros; im2col must be taken.
    for c_in in (1, 2):
        arrays = {
            "a": _with_nan(rng, _values(rng, (2, 6, 7, c_in), "random")),
            "kernel": _values(rng, (3, 3, c_in, 2), "random"),
        }
        checks.append(
            Check(
                f"correlate 3x3x{c_in}x2 with a NaN input (fallback from banded)",
                ir.Correlate(a, k, 1),
                arrays,
                BANDED,
                avoided=("_correlate_banded",),
            )
        )
    # Mixed dtypes, and an input whose pixels and channels are not adjacent in memory: the
    # element-wise patch copy of im2col, and the conversions before the row patches' copy
    # of whole pixels.
    mixed = {
        "a": _values(rng, (2, 6, 7, 3), "ties", np.float32),
        "kernel": _values(rng, (2, 3, 3, 2), "ties"),
    }
    apart = {
        "a": _values(rng, (2, 7, 6, 3), "random").transpose(0, 2, 1, 3)[:, :, :, ::-1],
        "kernel": _values(rng, (2, 2, 3, 2), "random"),
    }
    for path, settings, taken in (("im2col", IM2COL, ()), ("rows", ROWS, ("_correlate_rows",))):
        checks.append(
            Check(
                f"correlate float32 input, float64 kernel, {path}",
                ir.Correlate(a, k, 2),
                mixed,
                settings,
                taken,
                exact=True,
            )
        )
        checks.append(
            Check(
                f"correlate non-contiguous input, {path}",
                ir.Correlate(a, k, 1),
                apart,
                settings,
                taken,
            )
        )

    # correlate_weights: images and gradient maps at stride 1 (the IR dilates first).
    weight_paths = [
        ("shipped thresholds", {}, (), ()),
        ("banded", BANDED, ("_correlate_weights_banded",), ()),
        ("banded, narrow chunks", BANDED_NARROW, ("_correlate_weights_banded",), ()),
        ("im2col", IM2COL, (), ("_correlate_weights_banded",)),
        ("im2col, one-image blocks", {**IM2COL, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("banded, one-image blocks", {**BANDED, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("im2col, blocks of two", {**IM2COL, **BLOCKS_OF_TWO}, ("_blocks",), ()),
        ("rows", ROWS, (), ()),
        ("rows, one-image blocks", {**ROWS, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("rows, blocks of two", {**ROWS, **BLOCKS_OF_TWO}, ("_blocks",), ()),
    ]
    for (gh, gw), c_in, kind in itertools.product(
        [(1, 1), (3, 4), (5, 6)], (1, 2), ("random", "ties")
    ):
        n, h, w, c_out = 3, 7, 8, 2
        arrays = {
            "a": _values(rng, (n, h, w, c_in), kind),
            "g": _values(rng, (n, gh, gw, c_out), kind),
        }
        for name, settings, taken, avoided in weight_paths:
            if "banded" in name and c_in != 1:
                taken, avoided = (), ("_correlate_weights_banded",)
            if c_in > 1 and "im2col" in name:
                avoided = tuple(avoided) + ("_correlate_weights_rows",)
            if "rows" in name:
                if c_in > 1:
                    taken = tuple(taken) + ("_correlate_weights_rows",)
                else:
                    avoided = tuple(avoided) + ("_correlate_weights_rows",)
            checks.append(
                Check(
                    f"correlate_weights {h}x{w}x{c_in} with {gh}x{gw}x{c_out}, {kind} values, {name}",
                    ir.CorrelateWeights(a, g),
                    arrays,
                    settings,
                    tuple(taken),
                    tuple(avoided),
                    exact=kind == "ties",
                )
            )
    for nan_in in ("a", "g"):
        arrays = {
            "a": _values(rng, (2, 6, 7, 1), "random"),
            "g": _values(rng, (2, 3, 3, 2), "random"),
        }
        arrays[nan_in] = _with_nan(rng, arrays[nan_in])
        checks.append(
            Check(
                f"correlate_weights with a NaN in {nan_in} (banded: the NaN reaches only "
                "the weights whose terms hold it)",
                ir.CorrelateWeights(a, g),
                arrays,
                BANDED,
                ("_correlate_weights_banded",),
            )
        )

    # full_convolve: banded and col2im; col2im's blocks, and its zeros kept between calls
    # of the same layout; the bands' zeros kept between calls with other kernels.
    convolve_paths = [
        ("shipped thresholds", {}, (), ()),
        ("banded", BANDED, ("_full_convolve_banded",), ()),
        ("banded, narrow chunks", BANDED_NARROW, ("_full_convolve_banded",), ()),
        (
            "banded, one-image blocks",
            {**BANDED, **ONE_IMAGE_BLOCKS},
            ("_full_convolve_banded", "_blocks"),
            (),
        ),
        ("col2im", IM2COL, (), ("_full_convolve_banded",)),
        ("col2im, one-image blocks", {**IM2COL, **ONE_IMAGE_BLOCKS}, ("_blocks",), ()),
        ("col2im, blocks of two", {**IM2COL, **BLOCKS_OF_TWO}, ("_blocks",), ()),
    ]
    for (kh, kw), (gh, gw), c_in, kind in itertools.product(
        [(1, 1), (2, 3), (3, 3)], [(1, 1), (4, 3), (3, 4)], (1, 3), ("random", "ties")
    ):
        arrays = {
            "g": _values(rng, (3, gh, gw, 2), kind),
            "kernel": _values(rng, (kh, kw, c_in, 2), kind),
        }
        for name, settings, taken, avoided in convolve_paths:
            checks.append(
                Check(
                    f"full_convolve {gh}x{gw}x2 with {kh}x{kw}x{c_in}x2, {kind} values, {name}",
                    ir.FullConvolve(g, k),
                    arrays,
                    settings,
                    taken,
                    avoided,
                    exact=kind == "ties",
                )
            )
    # Kernels of 16 taps and more take the band under the shipped thresholds (LeNet's
    # second convolution: 5x5, 16 -> 6; here smaller, in two chunks of output columns).
    for kind in ("random", "ties"):
        arrays = {"g": _values(rng, (2, 3, 5, 3), kind), "kernel": _values(rng, (4, 4, 6, 3), kind)}
        checks.append(
            Check(
                f"full_convolve 3x5x3 with 4x4x6x3, {kind} values, shipped thresholds (banded)",
                ir.FullConvolve(g, k),
                arrays,
                taken=("_full_convolve_banded",),
                exact=kind == "ties",
            )
        )
    # NaN: the band's zeros would spread it to other outputs; col2im must be taken.
    arrays = {
        "g": _with_nan(rng, _values(rng, (2, 3, 4, 2), "random")),
        "kernel": _values(rng, (3, 3, 2, 2), "random"),
    }
    checks.append(
        Check(
            "full_convolve with a NaN gradient (fallback from banded)",
            ir.FullConvolve(g, k),
            arrays,
            BANDED,
            avoided=("_full_convolve_banded",),
        )
    )
    arrays = {
        "g": _values(rng, (2, 3, 4, 2), "ties", np.float32),
        "kernel": _values(rng, (2, 2, 2, 2), "ties"),
    }
    checks.append(
        Check(
            "full_convolve float32 gradient, float64 kernel",
            ir.FullConvolve(g, k),
            arrays,
            exact=True,
        )
    )
    return checks


def _window_checks(rng) -> list[Check]:
    checks = []
    a, g = ir.Operand("a"), ir.Operand("g")
    for (h, w), size, stride, kind in itertools.product(
        [(5, 5), (6, 7)], (1, 2, 3), (1, 2, 3), ("random", "ties")
    ):
        x = _values(rng, (2, h, w, 2), kind)
        out_h, out_w = (h - size) // stride + 1, (w - size) // stride + 1
        exact = kind == "ties"
        label = f"{h}x{w} size {size} stride {stride}, {kind} values"
        checks.append(
            Check(f"window_sum {label}", ir.WindowSum(a, size, stride), {"a": x}, exact=exact)
        )
        checks.append(Check(f"window_argmax {label}", ir.WindowArgmax(a, size, stride), {"a": x}))
        index = rng.integers(0, size * size, size=(2, out_h, out_w, 2))
        checks.append(
            Check(
                f"gather_windows {label}",
                ir.GatherWindows(a, ir.Operand("index"), size, stride),
                {"a": x, "index": index},
                exact=True,
            )
        )
        gradient = _values(rng, (2, out_h, out_w, 2), kind)
        route = "_window_offsets" if stride >= size else "_masks"
        checks.append(
            Check(
                f"route_to_argmax {label} ({'windows apart' if stride >= size else 'overlapping windows'})",
                ir.RouteToArgmax(g, ir.Operand("index"), size, stride, h, w),
                {"g": gradient, "index": index},
                taken=(route,),
                exact=exact,
            )
        )
        checks.append(
            Check(
                f"scatter_windows {label}",
                ir.ScatterWindows(g, size, stride, h, w),
                {"g": gradient},
                exact=exact,
            )
        )
        if size * size > 1:
            # Inside the first window of a random image and channel: some window must hold it.
            nan_input = x.copy()
            nan_input[
                rng.integers(0, 2), rng.integers(0, size), rng.integers(0, size), rng.integers(0, 2)
            ] = np.nan
            checks.append(
                Check(
                    f"window_argmax {label} with a NaN (fallback)",
                    ir.WindowArgmax(a, size, stride),
                    {"a": nan_input},
                    taken=("sliding_window_view",),
                )
            )
    # Without an unsigned type of its width (long double), route_to_argmax selects by
    # boolean masks instead of bits.
    if _unsigned_like(np.longdouble) is None:
        index = rng.integers(0, 4, size=(2, 3, 3, 2))
        checks.append(
            Check(
                "route_to_argmax long double, overlapping windows",
                ir.RouteToArgmax(g, ir.Operand("index"), 2, 1, 4, 4),
                {"g": _values(rng, (2, 3, 3, 2), "ties", np.longdouble), "index": index},
                exact=True,
            )
        )
    for size, kind in itertools.product((1, 2, 3), ("random", "ties")):
        checks.append(
            Check(
                f"upsample size {size}, {kind} values",
                ir.Upsample(a, size),
                {"a": _values(rng, (2, 3, 4, 3), kind)},
                exact=True,
            )
        )
    return checks


def _unsigned_like(dtype):
    """The unsigned integer type as wide as ``dtype`` (to compare floats bit for bit), or
    None where there is none (long double on most machines)."""
    try:
        return np.dtype(f"u{np.dtype(dtype).itemsize}")
    except TypeError:
        return None


def _shape_checks(rng) -> list[Check]:
    checks = []
    a, k = ir.Operand("a"), ir.Operand("kernel")
    for rows, cols in [(0, 0), (1, 0), (0, 2), (2, 1)]:
        checks.append(
            Check(
                f"pad rows {rows} cols {cols}",
                ir.Pad(a, rows, cols),
                {"a": _values(rng, (2, 3, 4, 2), "random")},
                exact=True,
            )
        )
    for top, left, height, width in [(0, 0, 3, 4), (1, 1, 2, 2), (0, 0, 5, 6), (2, 1, 3, 5)]:
        checks.append(
            Check(
                f"crop at {top},{left} size {height}x{width}",
                ir.Crop(a, top, left, height, width),
                {"a": _values(rng, (2, 4, 5, 2), "random")},
                exact=True,
            )
        )
    for stride in (1, 2, 3):
        checks.append(
            Check(
                f"dilate stride {stride}",
                ir.Dilate(a, stride),
                {"a": _values(rng, (2, 3, 4, 2), "random")},
                exact=True,
            )
        )
    checks.append(
        Check("rot180", ir.Rot180(k), {"kernel": _values(rng, (3, 2, 2, 3), "random")}, exact=True)
    )
    z = ir.Operand("z")
    for shape, scale in [((3, 5), 1.0), ((2, 3, 4), 1.0), ((3, 4), 700.0)]:
        values = {"z": rng.uniform(-1.0, 1.0, size=shape) * scale}
        checks.append(Check(f"softmax {shape} scale {scale}", ir.Softmax(z), values))
        checks.append(Check(f"logsumexp {shape} scale {scale}", ir.LogSumExp(z), values))
    return checks


def _sum_checks(rng) -> list[Check]:
    """sum_leading, which the emitter calls for a Sum over leading axes."""
    checks = []
    a = ir.Operand("a")
    for shape, count, kind, dtype in [
        ((4, 8, 8, 3), 3, "ties", np.float64),
        ((4, 8, 8, 3), 3, "random", np.float64),
        ((6, 5, 7, 2), 3, "ties", np.float32),
        ((16, 5), 1, "random", np.float64),
        ((3, 4, 2, 6), 2, "ties", np.float64),
    ]:
        array = _values(rng, shape, kind, dtype)
        for name, settings, taken in [
            ("rows joined", {"_SUM_MIN_SIZE": 1}, ("math.gcd",)),
            ("rows as they are", {"_SUM_MIN_SIZE": _NEVER}, ()),
        ]:
            label = f"sum_leading {shape} over {count} axes, {kind} {np.dtype(dtype).name}, {name}"
            node = ir.Sum(a, tuple(range(count)))
            checks.append(Check(label, node, {"a": array}, settings, taken, exact=kind == "ties"))
    if _unsigned_like(np.longdouble) is None:  # no BLAS for long double: never joined
        array = _values(rng, (4, 8, 8, 3), "ties", np.longdouble)
        node = ir.Sum(a, (0, 1, 2))
        checks.append(
            Check("sum_leading long double", node, {"a": array}, {"_SUM_MIN_SIZE": 1}, exact=True)
        )
    return checks


def _elementwise_problems(module, rng) -> list[str]:
    """with_vector and with_scalar against the plain NumPy call they stand for."""
    problems = []
    image = rng.uniform(-1.0, 1.0, size=(3, 6, 5, 4))
    vector = rng.uniform(-1.0, 1.0, size=4)
    for ufunc in (np.add, np.subtract, np.multiply, np.divide):
        for x, y in ((image, vector), (vector, image)):
            out = np.empty(image.shape)
            got = module.with_vector(ufunc, x, y, out)
            if not np.array_equal(got, ufunc(x, y)):
                problems.append(f"with_vector({ufunc.__name__}) differs from {ufunc.__name__}")
    for ufunc in (np.maximum, np.minimum):
        for x, y in ((image, 0.0), (0.0, image)):
            out = np.empty(image.shape)
            got = module.with_scalar(ufunc, x, y, out)
            if not np.array_equal(got, ufunc(x, y)):
                problems.append(f"with_scalar({ufunc.__name__}) differs from {ufunc.__name__}")
    return problems


def _flush_problems(module, rng) -> list[str]:
    """flush_subnormals against derive.functions.flush_subnormal: the identity (signed
    zeros, infinities and NaNs too) on every value that is not subnormal, and
    0 for every subnormal one, whatever the float type and wherever ``out`` points."""
    problems = []
    for dtype in (np.float16, np.float32, np.float64, np.longdouble):
        info = np.finfo(dtype)
        special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.tiny, -info.tiny], dtype)
        # Magnitudes from a hundredth of tiny up: above the smallest subnormal of every type.
        subnormal = (
            info.tiny * rng.uniform(0.01, 1.0, size=40) * rng.choice([-1.0, 1.0], size=40)
        ).astype(dtype)
        normal = rng.normal(size=60).astype(dtype)
        with_subnormals = np.concatenate([special, subnormal, normal])
        # Without subnormal values the kernel takes its early way out: nothing may change.
        without = np.concatenate([special, normal])
        # Values all on one side of zero take a shorter test (one reduction): with and
        # without subnormal values among them, and with a NaN, on either side.
        positive = np.abs(np.concatenate([normal, np.array([info.tiny, np.inf], dtype)]))
        positive_subnormal = np.concatenate([positive, np.abs(subnormal)])
        positive_nan = np.concatenate([positive, np.array([np.nan], dtype)])
        one_sided = [positive, positive_subnormal, positive_nan]
        one_sided += [-values for values in one_sided]
        cases = itertools.product(
            (with_subnormals, without, *one_sided), ("new", "in place", "other")
        )
        for values, where in cases:
            values = values[rng.permutation(values.size)].reshape(-1, 1)
            is_subnormal = (values != 0) & (np.abs(values) < info.tiny)
            expected = np.where(is_subnormal, dtype(0), values)
            a = values.copy()
            if where == "new":
                got = module.flush_subnormals(a)
            elif where == "in place":
                got = module.flush_subnormals(a, out=a)
            else:
                got = module.flush_subnormals(a, out=np.full_like(a, 7))
            # Values and signs compared, not bytes: a long double's padding bytes are
            # arbitrary.
            same = np.array_equal(got, expected, equal_nan=True) and np.array_equal(
                np.signbit(got), np.signbit(expected)
            )
            if got.dtype != dtype or not same:
                problems.append(
                    f"flush_subnormals ({np.dtype(dtype).name}, out: {where}) is not x with "
                    "only its subnormal values set to 0"
                )
            if where != "in place" and not np.array_equal(a, values, equal_nan=True):
                problems.append(f"flush_subnormals ({np.dtype(dtype).name}) changed its input")
    return problems


def _routed_reference(g, index, size, height, width) -> np.ndarray:
    """The interpreter's route_to_argmax for windows ``size`` apart."""
    node = ir.RouteToArgmax(ir.Operand("g"), ir.Operand("index"), size, size, height, width)
    return reference(node, {"g": g, "index": index})


def _remembered_offsets_problems(module, rng) -> list[str]:
    """A max pool's forward then backward with one index: the backward takes the
    offsets its forward computed (no second computation); an index changed in one
    element, or a workspace written into in between, still routes exactly."""
    problems = []
    size, height, width = 2, 6, 8
    a = _values(rng, (2, height, width, 3), "ties")
    index = np.array(module.window_argmax(a, size, size))
    g = _values(rng, index.shape, "random")
    watch = _Watch(module, {"_computed_offsets"})
    try:
        workspace: dict = {}
        # An earlier step's index first: the offsets remembered must then be replaced.
        for step_index in (np.zeros_like(index), index):
            gathered = module.gather_windows(
                a, step_index, size, size, workspace=workspace, key="forward"
            )
            node = ir.GatherWindows(ir.Operand("a"), ir.Operand("index"), size, size)
            expected = reference(node, {"a": a, "index": step_index})
            if not np.array_equal(gathered, expected):
                problems.append("gather_windows after another index gathers wrongly")
        computed = watch.calls["_computed_offsets"]
        if computed != 2:
            problems.append("gather_windows took offsets remembered for another index")
        _spoil(workspace)
        routed = module.route_to_argmax(
            g, index, size, size, height, width, workspace=workspace, key="backward"
        )
        if watch.calls["_computed_offsets"] != computed:
            problems.append("route_to_argmax computed again the offsets its gather computed")
        if not np.array_equal(routed, _routed_reference(g, index, size, height, width)):
            problems.append("route_to_argmax with remembered offsets routes wrongly")
        changed = index.copy()
        changed[1, 2, 3, 2] = (changed[1, 2, 3, 2] + 1) % (size * size)
        routed = module.route_to_argmax(g, changed, size, size, height, width)
        if watch.calls["_computed_offsets"] == computed:
            problems.append("route_to_argmax took offsets remembered for another index")
        if not np.array_equal(routed, _routed_reference(g, changed, size, height, width)):
            problems.append("route_to_argmax with a changed index routes wrongly")
    finally:
        watch.restore()
    return problems


def _gather_at_argmax_problems(module, rng) -> list[str]:
    """A max pool's forward as the generated code runs it: window_argmax, then
    gather_windows at that index of the same input with ``argmax_key``, which returns the
    maxima window_argmax kept. The result must be the element at each window's first
    maximum bit for bit (the interpreter's index, the element read from the input): with
    windows whose maximum is 0.0 or -0.0 in either order, NaN windows, and an index that
    is not the one window_argmax kept. Without zeros or NaN no offset may be computed."""
    problems = []
    for (size, stride), kind, dtype in itertools.product(
        ((2, 2), (3, 3), (2, 1), (3, 2)),
        ("random", "ties", "signed zeros", "NaN"),
        (np.float32, np.float64),
    ):
        shape = (2, 7, 8, 3)
        if kind == "signed zeros":
            a = rng.choice([-0.0, 0.0, -1.0], size=shape).astype(dtype)
        else:
            a = _values(rng, shape, "ties" if kind == "ties" else "random", dtype)
            if kind == "ties":
                a = a + dtype(3)  # positive: maxima never zero
            if kind == "NaN":
                a = _with_nan(rng, a)
        label = (
            f"gather_windows at window_argmax's index ({size}x{size} stride {stride}, {kind}, "
            f"{np.dtype(dtype).name})"
        )
        index_reference = _window_argmax_reference(a.astype(np.float64), size, stride)
        windows = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(1, 2))
        windows = windows[:, ::stride, ::stride].reshape(index_reference.shape + (size * size,))
        expected = np.take_along_axis(windows, index_reference[..., None], axis=-1)[..., 0]
        bits = _unsigned_like(dtype)
        workspace: dict = {}
        watch = _Watch(module, {"_window_offsets"})
        try:
            index = module.window_argmax(a, size, stride, workspace=workspace, key="argmax")
            # Its own index, then another one (the first position of every window): the
            # kept maxima belong to the first only.
            first_positions = np.zeros_like(index)
            for given, wanted, name in (
                (index, expected, "its index"),
                (first_positions, windows[..., 0], "another index"),
            ):
                got = np.array(
                    module.gather_windows(
                        a,
                        given,
                        size,
                        stride,
                        argmax_key="argmax",
                        workspace=workspace,
                        key="gather",
                    )
                )
                if got.dtype != wanted.dtype or not np.array_equal(
                    got.view(bits), np.ascontiguousarray(wanted).view(bits)
                ):
                    problems.append(f"{label}, given {name}: not the element at that index")
            if kind in ("random", "ties") and watch.calls["_window_offsets"] != 1:
                problems.append(f"{label}: gathered instead of taking the kept maxima")
        finally:
            watch.restore()
    # Windows of size 1 keep no maxima: a later call in the same workspace must not take
    # those of an earlier call with larger windows and an output of the same shape.
    workspace = {}
    larger = _values(rng, (2, 4, 4, 3), "random")
    module.window_argmax(larger, 2, 2, workspace=workspace, key="argmax")
    single = _values(rng, (2, 2, 2, 3), "random")
    index = module.window_argmax(single, 1, 1, workspace=workspace, key="argmax")
    got = module.gather_windows(
        single, index, 1, 1, argmax_key="argmax", workspace=workspace, key="gather"
    )
    if not np.array_equal(got, single):
        problems.append("gather_windows in 1x1 windows took maxima kept by an earlier call")
    return problems


def _kept_patches_problems(banded, im2col, rng) -> list[str]:
    """A convolution's forward then its weights' gradient of one input: the weights take
    the patches the forward unrolled (no second unrolling), for one-channel rows
    (banded), multi-channel row patches and multi-channel windows (im2col); the same
    array written into in between, or another input of the same shape, is unrolled
    again and correlated exactly."""
    problems = []
    for label, module, c_in, unroll in (
        ("rows", banded, 1, "_row_patches"),
        ("channel rows", banded, 2, "_channel_rows"),
        ("windows", im2col, 2, "_copy_window_rows"),
    ):
        a = _values(rng, (2, 7, 8, c_in), "ties")
        kernel = _values(rng, (3, 3, c_in, 2), "ties")
        g = _values(rng, (2, 5, 6, 2), "ties")
        node = ir.CorrelateWeights(ir.Operand("a"), ir.Operand("g"))
        watch = _Watch(module, {unroll})
        try:
            _forget_kept_patches(module)
            module.correlate(a, kernel)
            unrolled = watch.calls[unroll]
            if not unrolled:
                problems.append(f"kept {label}: the forward did not unroll through {unroll}")
            for step, change in enumerate((None, "in place", "another array")):
                if change == "in place":
                    a[1, 2, 3, 0] += 1  # the array the forward unrolled, written into
                elif change == "another array":
                    a = a.copy()  # another array, of other values
                    a[0, 0, 0, c_in - 1] -= 1
                before = watch.calls[unroll]
                got = module.correlate_weights(a, g)
                again = watch.calls[unroll] > before
                if change is None and again:
                    problems.append(f"kept {label}: the weights unrolled the forward's input again")
                if change is not None and not again:
                    problems.append(f"kept {label}: patches taken for an input changed {change}")
                if not np.array_equal(got, reference(node, {"a": a, "g": g})):
                    problems.append(f"kept {label}: correlate_weights wrong after step {step}")
        finally:
            watch.restore()
    return problems


def all_checks(seed: int = 0) -> list[Check]:
    rng = np.random.default_rng(seed)
    return _convolution_checks(rng) + _window_checks(rng) + _shape_checks(rng) + _sum_checks(rng)


@functools.lru_cache(maxsize=2)
def _checks_with_references(seed: int) -> tuple[tuple[Check, np.ndarray], ...]:
    """Every check with the interpreter's value, computed once per process: the values
    depend on the inputs only, not on the kernels under test."""
    prepared, references = [], {}
    for check in all_checks(seed):
        key = id(check.arrays), check.node
        if key not in references:
            if isinstance(check.node, ir.WindowArgmax):
                references[key] = _window_argmax_reference(
                    check.arrays["a"], int(check.node.size), int(check.node.stride)
                )
            else:
                references[key] = reference(check.node, check.arrays)
        prepared.append((check, references[key]))
    return tuple(prepared)


def check_kernels(source: Path = KERNELS_SOURCE, seed: int = 0) -> tuple[int, list[str]]:
    """(number of checks run, failures): every kernel of ``source`` against the SymPy
    interpreter of its primitive, every forced path, with and without a workspace."""
    cache: dict = {}
    failures: list[str] = []
    prepared = _checks_with_references(seed)
    for check, expected in prepared:
        module = _module_for_source(source, check.settings, cache)
        failures += _run(module, check, expected)
    rng = np.random.default_rng(seed)
    for settings in (
        {"_SCALAR_ROW_MIN_SIZE": 0, "_SCALAR_ROW_MIN_LENGTH": 0},
        {"_SCALAR_ROW_MIN_SIZE": _NEVER},
    ):
        failures += _elementwise_problems(_module_for_source(source, settings, cache), rng)
    failures += _flush_problems(_module_for_source(source, {}, cache), rng)
    failures += _remembered_offsets_problems(_module_for_source(source, {}, cache), rng)
    failures += _kept_patches_problems(
        _module_for_source(source, BANDED, cache),
        _module_for_source(source, {"_ROWS_MAX_WEIGHTS": 0}, cache),
        rng,
    )
    failures += _gather_at_argmax_problems(_module_for_source(source, {}, cache), rng)
    return len(prepared) + 6, failures


def _module_for_source(source: Path, settings: dict, cache: dict):
    key = (str(source),) + tuple(sorted((name, repr(value)) for name, value in settings.items()))
    if key not in cache:
        module = load_kernels(source, name=f"kernels_under_test_{len(cache)}")
        for name, value in settings.items():
            if not hasattr(module, name):
                raise KernelConformanceError(
                    f"{source.name} has no {name}: a fast path's switch was renamed or "
                    "removed; update the checks in codegen/conformance.py to force the new one"
                )
            setattr(module, name, value)
        cache[key] = module
    return cache[key]


def signature_problems(module) -> list[str]:
    """The emitter passes a kernel its arrays and integers as keywords named after the IR
    node's fields (and sum_leading ``a`` and ``count``): each kernel must take exactly
    those, and ``workspace`` and ``key`` where the emitter passes them."""
    expected = {name: [f.name for f in fields(node)] for node, name in KERNELS.items()}
    expected["sum_leading"] = ["a", "count"]
    # gather_windows also takes the key of the window_argmax call that made its index
    # (Emitter.argmax_key).
    expected["gather_windows"].append("argmax_key")
    problems = []
    for kernel, names in sorted(expected.items()):
        function = getattr(module, kernel, None)
        if function is None:
            problems.append(f"{kernel}: missing from the runtime library")
            continue
        parameters = inspect.signature(function).parameters
        wanted = set(names) | ({"workspace", "key"} if kernel in WORKSPACE_KERNELS else set())
        if set(parameters) != wanted:
            problems.append(
                f"{kernel} takes ({', '.join(parameters)}); the emitter passes {', '.join(sorted(wanted))}"
            )
    return problems


def require_conformance(source: Path = KERNELS_SOURCE) -> int:
    """Run every check; raise KernelConformanceError naming the first failures.  Returns
    the number of checks."""
    problems = signature_problems(load_kernels(source))
    checked = {kernel_name(check.node) for check in all_checks()}
    problems += [
        f"{kernel}: no conformance check; add its checks to codegen/conformance.py"
        for kernel in sorted((set(KERNELS.values()) | {"sum_leading"}) - checked)
    ]
    if problems:
        raise KernelConformanceError(
            "the runtime library does not fit the calls the emitter writes, or is not "
            "checked, so nothing was generated:\n" + "\n".join(f"  {line}" for line in problems)
        )
    count, failures = check_kernels(source)
    if failures:
        shown = "\n".join(f"  {line}" for line in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise KernelConformanceError(
            f"in {len(failures)} check(s), the runtime library ({source.name}) and derive's "
            "reading of the primitives (derive/symbolic.py) disagree, so nothing was "
            f"generated:\n{shown}{more}"
        )
    return count
