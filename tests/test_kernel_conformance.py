"""The runtime library (codegen/runtime/kernels.py) conforms to derive's definitions of the
primitives on every forced path (codegen/conformance.py), and the check refuses kernels
with the bugs that the proofs of the trees alone cannot see."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from codegen import emit as emit_module
from codegen import render
from codegen.conformance import (
    KERNELS_SOURCE,
    KernelConformanceError,
    all_checks,
    check_kernels,
    kernel_name,
    load_kernels,
    require_conformance,
    signature_problems,
)
from codegen.emit import KERNELS
from derive import ir


def test_every_kernel_agrees_with_the_definitions_on_every_path():
    count, failures = check_kernels()
    assert failures == []
    assert count > 500


def test_every_kernel_the_emitter_calls_is_checked():
    checked = {kernel_name(check.node) for check in all_checks()}
    assert checked == set(KERNELS.values()) | {"sum_leading"}


@pytest.mark.parametrize(
    "path",
    [
        "banded",
        "banded, narrow chunks",
        "im2col",
        "rows",
        "one-image blocks",
        "blocks of two",
        "NaN",
        "overlapping windows",
        "windows apart",
        "stride 3",
    ],
)
def test_every_fast_path_is_forced_somewhere(path):
    assert any(path in check.label for check in all_checks())


# (what the bug is, the exact text in codegen/runtime/kernels.py, the text it becomes)
MUTATIONS = [
    (
        "kernel rows flipped in the banded correlation",
        "np.copyto(diagonals, kernel.transpose(1, 0, 2)[None])",
        "np.copyto(diagonals, kernel[::-1].transpose(1, 0, 2)[None])",
    ),
    (
        "a column shift in dilate",
        "out[:, ::stride, ::stride, :] = a",
        "out[:, ::stride, ::stride, :] = np.roll(a, 1, axis=2)",
    ),
    (
        "window_argmax letting the last maximum win a tie",
        "    np.less(positions[-2], top, out=below)\n"
        "    np.copyto(index, below)\n"
        "    for candidate in positions[-3::-1]:\n"
        "        np.less(candidate, top, out=below)\n"
        "        index += 1\n"
        "        np.multiply(index, below, out=index)",
        "    for position, candidate in enumerate(positions):\n"
        "        np.equal(candidate, top, out=below)\n"
        "        np.copyto(index, position, where=below)",
    ),
    (
        "an off-by-one in full_convolve for odd gradient widths (a gradient dilated by stride 2)",
        "offset = ((kh - 1 - u) * width + (kw - 1 - v)) * m",
        "offset = ((kh - 1 - u) * width + (kw - 1 - v) + (gw % 2 == 1)) * m",
    ),
    (
        "an off-by-one in full_convolve for even gradient widths",
        "offset = ((kh - 1 - u) * width + (kw - 1 - v)) * m",
        "offset = ((kh - 1 - u) * width + (kw - 1 - v) + (gw % 2 == 0)) * m",
    ),
    (
        "the banded correlation kept for an input with a NaN",
        "if c_in == 1 and stride == 1 and kh * kw >= _BANDED_MIN_TAPS and np.isfinite(a).all():",
        "if c_in == 1 and stride == 1 and kh * kw >= _BANDED_MIN_TAPS:",
    ),
    (
        "the banded full convolution kept for a gradient with a NaN",
        "if taps >= _BANDED_MIN_TAPS and np.isfinite(g).all():",
        "if taps >= _BANDED_MIN_TAPS:",
    ),
    (
        "the banded full convolution adding kernel row u where row KH-1-u belongs",
        "target = image_rows[:, kh - 1 - u : kh - 1 - u + gh]",
        "target = image_rows[:, u : u + gh]",
    ),
    (
        "the banded full convolution's kernel columns in mirrored order on the band",
        "np.copyto(diagonals, kernel.transpose(1, 3, 0, 2)[:, None])",
        "np.copyto(diagonals, kernel[:, ::-1].transpose(1, 3, 0, 2)[:, None])",
    ),
    (
        "the row patches' product taking the kernel's taps in (u, v, c) order",
        "weights = kernel.transpose(1, 0, 2, 3).reshape(depth, c_out)",
        "weights = kernel.reshape(depth, c_out)",
    ),
    (
        "the row patches unrolled at stride 1 whatever the stride",
        "strides=(n_step, y_step * stride, x_step, y_step),",
        "strides=(n_step, y_step, x_step, y_step),",
    ),
    (
        "the weights' gradient from the row patches with its kernel rows and columns swapped",
        "sums.reshape(c_out, kw, kh, c_in).transpose(2, 1, 3, 0)",
        "sums.reshape(c_out, kh, kw, c_in).transpose(1, 2, 3, 0)",
    ),
    (
        "sum_leading's joined rows summed wrongly",
        "partial = partial.reshape(joined, columns).sum(axis=0)",
        "partial = partial.reshape(joined, columns)[1:].sum(axis=0)",
    ),
    (
        "flush_subnormals also zeroing the smallest normal values",
        "np.less(bits, bound, out=found)",
        "np.less_equal(bits, bound, out=found)",
    ),
    (
        "flush_subnormals zeroing only positive subnormal values",
        "np.add(values, values, out=bits)",
        "np.copyto(bits, values)",
    ),
    (
        "flush_subnormals deciding that no value is subnormal from the largest bits",
        "if bits.min() < bound:",
        "if bits.max() < bound:",
    ),
    (
        "flush_subnormals' one-sided test taking zero for its bound",
        "        if out.min() >= tiny:",
        "        if out.min() >= 0:",
    ),
    (
        "flush_subnormals' one-sided test for negative values taking zero for its bound",
        "elif (samples < 0).all() and out.max() <= -tiny:",
        "elif (samples < 0).all() and out.max() <= 0:",
    ),
    (
        "gather_windows taking window_argmax's maxima when one of them is zero",
        "        if maxima.all():",
        "        if True:",
    ),
    (
        "gather_windows taking window_argmax's maxima for any index",
        "and workspace.get(argmax_key + _MAXIMA_OF) is index",
        "and workspace.get(argmax_key + _MAXIMA_OF) is not None",
    ),
    (
        "window_argmax leaving an earlier call's maxima for gather_windows",
        "        workspace.pop(key + _MAXIMA_OF, None)",
        "        pass",
    ),
    (
        "window offsets remembered for any index of the same shape",
        "if kept is not None and np.array_equal(kept[0], index):",
        "if kept is not None:",
    ),
    (
        "window offsets remembered without their index",
        "    np.copyto(copy, index)\n",
        "",
    ),
    (
        "kept patches taken for any input of the same shape",
        "    if not np.array_equal(copy.view(bits), source.view(bits)):\n        return None\n",
        "",
    ),
    (
        "kept patches remembered without a copy of their input",
        "    np.copyto(copy, source)\n",
        "",
    ),
    (
        "flush_subnormals writing into its input when given another out",
        "    elif out is not a:\n        np.copyto(out, a)",
        "    elif out is not a:\n        out = a",
    ),
]


def _mutated(tmp_path: Path, old: str, new: str) -> Path:
    source = KERNELS_SOURCE.read_text(encoding="utf-8")
    assert source.count(old) == 1, f"the mutation's anchor is gone from kernels.py: {old!r}"
    path = tmp_path / "kernels.py"
    path.write_text(source.replace(old, new), encoding="utf-8")
    return path


@pytest.mark.parametrize("bug, old, new", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_kernel_with_a_bug_is_refused(tmp_path, bug, old, new):
    with pytest.raises(KernelConformanceError, match="nothing was generated"):
        require_conformance(_mutated(tmp_path, old, new))


def test_generate_writes_nothing_over_a_kernel_that_disagrees(tmp_path, monkeypatch):
    bug, old, new = MUTATIONS[0]
    monkeypatch.setattr(render, "KERNELS", _mutated(tmp_path, old, new))
    output = tmp_path / "generated"
    with pytest.raises(KernelConformanceError):
        render.generate(output=output)
    assert not output.exists()


def test_the_kernels_take_the_keywords_the_emitter_passes(tmp_path):
    assert signature_problems(load_kernels()) == []
    renamed = _mutated(
        tmp_path, "def crop(a, top, left, height, width):", "def crop(a, left, top, height, width):"
    )
    assert signature_problems(load_kernels(renamed)) == []  # same names, any order: keywords
    renamed = _mutated(
        tmp_path, "def crop(a, top, left, height, width):", "def crop(a, top, left, rows, width):"
    )
    (problem,) = signature_problems(load_kernels(renamed))
    assert problem.startswith("crop takes (a, top, left, rows, width)")
    with pytest.raises(KernelConformanceError, match="does not fit the calls"):
        require_conformance(renamed)


@dataclasses.dataclass(frozen=True)
class NewPrimitive(ir.Node):
    a: ir.Node


def test_a_kernel_without_checks_is_refused(monkeypatch):
    monkeypatch.setitem(emit_module.KERNELS, NewPrimitive, "rot180_twice")
    with pytest.raises(KernelConformanceError, match="rot180_twice: no conformance check"):
        require_conformance()
