"""NumPy primitives over named index spaces, for layers defined by one equation.

This file is hand-written: ``cnnderive generate --equation`` copies it verbatim, as
``_indexed.py``, into every package it writes.  Each function is the NumPy reading of a
node of ``derive/ir.py`` (IndexView, Contract, ScatterContract, ArgmaxView, TakeView,
RouteView, ZeroPad, CropAxes), whose element-by-element meaning is
``derive/symbolic.py``; the tests compare the two.

Index maps are written as the equation writes them (``"n, 2*i+u, 2*j+v, c"``) and
index lists as names separated by spaces (``"n i j u v c"``).  Reads through a map
are strided views of the array: no copy, no Python loop over elements.  Writing back
through a map (the adjoint of a read) loops over the indices that share an axis with
a longer one, the kernel offsets: at most K_H * K_W iterations for a convolution,
each one strided block of the result.
"""

from __future__ import annotations

import functools
import itertools
import re
import string

import numpy as np
from numpy.lib.stride_tricks import as_strided

_TERM = re.compile(r"\s*([+-]?)\s*(?:(\d+)\s*\*\s*)?([A-Za-z_][A-Za-z_0-9]*|\d+)\s*")


@functools.lru_cache(maxsize=None)
def parse_map(text: str) -> tuple[tuple[tuple[tuple[str, int], ...], ...], tuple[int, ...]]:
    """``"n, 2*i+u-1"`` -> (((("n", 1),), (("i", 2), ("u", 1))), (0, -1))."""
    axes, offsets = [], []
    for part in text.split(","):
        terms, offset, position = [], 0, 0
        part = part.strip()
        while position < len(part):
            match = _TERM.match(part, position)
            if match is None or match.end() == position:
                raise ValueError(f"not an affine index: {part!r}")
            sign = -1 if match.group(1) == "-" else 1
            factor = int(match.group(2) or 1)
            atom = match.group(3)
            if atom.isdigit():
                offset += sign * factor * int(atom)
            else:
                terms.append((atom, sign * factor))
            position = match.end()
        axes.append(tuple(terms))
        offsets.append(offset)
    return tuple(axes), tuple(offsets)


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _strided(a: np.ndarray, axes, offsets, names, extents, writeable=False) -> np.ndarray:
    """The view ``v[I] = a[offsets + sum(coefficient * I)]`` with one axis per name."""
    start = a[tuple(slice(offset, offset + 1) for offset in offsets)]
    strides = []
    for name in names:
        stride = 0
        for axis, terms in enumerate(axes):
            for term, coefficient in terms:
                if term == name:
                    stride += coefficient * a.strides[axis]
        strides.append(stride)
    return as_strided(start, shape=tuple(extents), strides=tuple(strides), writeable=writeable)


def zero_pad(a, widths):
    """``a`` with ``widths[k]`` zeros before and after axis ``k``."""
    return np.pad(a, [(w, w) for w in widths])


def crop_axes(a, starts, extents):
    """``a[starts[k] : starts[k] + extents[k]]`` on every axis (a copy)."""
    return a[tuple(slice(s, s + n) for s, n in zip(starts, extents))].copy()


def index_view(a, read, indices, extents):
    """``view[I] = a[read(I)]``, one axis per name in ``indices``: a read-only view."""
    axes, offsets = parse_map(read)
    return _strided(a, axes, offsets, _names(indices), extents)


def _letters(names) -> dict[str, str]:
    if len(names) > 52:
        raise ValueError("more than 52 index names in one contraction")
    return dict(zip(names, string.ascii_letters))


def contract(subscripts, out_indices, *factors):
    """Einstein summation over named indices: ``subscripts`` holds one name list per factor."""
    lists = [_names(s) for s in subscripts]
    out = _names(out_indices)
    # An index found in one factor only, and not kept, is summed out of that factor first
    # (sum[m] of g[n,m] before it meets X[n,f]): einsum would otherwise multiply through
    # all of n, m and f.
    factors = list(factors)
    for k, names in enumerate(lists):
        others = set(out).union(*[set(other) for j, other in enumerate(lists) if j != k])
        private = [axis for axis, name in enumerate(names) if name not in others]
        if private and len(lists) > 1:
            factors[k] = np.sum(factors[k], axis=tuple(private))
            lists[k] = tuple(name for name in names if name in others)
    letters = _letters(list(dict.fromkeys(itertools.chain(*lists, out))))
    spec = ",".join("".join(letters[n] for n in names) for names in lists)
    spec += "->" + "".join(letters[n] for n in out)
    # An index kept in the output and present in every factor (the channel of a
    # depthwise convolution) leaves no matrix product for BLAS: NumPy's own loop over the
    # strided views is then faster than the copies a BLAS path makes.  Otherwise the
    # contraction goes to BLAS (for a convolution, over the copied windows: im2col).
    shared = set(out).intersection(*[set(names) for names in lists]) if len(lists) > 1 else set()
    if shared:
        return np.einsum(spec, *factors, optimize=False)
    return np.einsum(spec, *factors, optimize="greedy")


def _write_plan(axes, extents: dict[str, int], in_factors=frozenset()):
    """Which written indices to loop over so that, with those fixed, every axis holds at
    most one of the others (the kept ones): each loop step then writes one strided
    block without collisions.  In an axis with several indices the longest one that the
    factors vary along is kept (an index no factor has only repeats the same block)."""
    kept: list[str] = []
    loops: list[str] = []
    for terms in axes:
        free = [name for name, _ in terms if name not in loops]
        if len(free) <= 1:
            kept += [name for name in free if name not in kept]
            continue
        chosen = [name for name in free if name in kept]
        keep = (
            chosen[0] if chosen else max(free, key=lambda name: (name in in_factors, extents[name]))
        )
        if keep not in kept:
            kept.append(keep)
        loops += [name for name in free if name != keep and name not in loops]
    return kept, loops


def scatter_contract(shape, write, names, extents, subscripts, *factors):
    """A zero array of ``shape`` to which the product of the factors is added at
    ``write(I)`` for every value of the indices ``names`` (lengths ``extents``);
    indices that ``write`` does not use are summed over."""
    axes, offsets = parse_map(write)
    lists = [_names(s) for s in subscripts]
    lengths = dict(zip(_names(names), extents))
    kept, loops = _write_plan(axes, lengths, frozenset(itertools.chain(*lists)))
    out = np.zeros(tuple(shape), dtype=np.result_type(*factors))
    for values in itertools.product(*[range(lengths[name]) for name in loops]):
        fixed = dict(zip(loops, values))
        views, view_lists = [], []
        for factor, names_k in zip(factors, lists):
            index = tuple(fixed[name] if name in fixed else slice(None) for name in names_k)
            views.append(factor[index])
            view_lists.append(" ".join(name for name in names_k if name not in fixed))
        varying = [name for name in kept if any(name in _names(n) for n in view_lists)]
        block = contract(view_lists, " ".join(varying), *views)
        # Kept indices that no factor has: the block is the same along them (broadcast).
        block = block.reshape([lengths[name] if name in varying else 1 for name in kept])
        start = tuple(
            offset + sum(c * fixed[name] for name, c in terms if name in fixed)
            for terms, offset in zip(axes, offsets)
        )
        kept_axes = tuple(
            tuple((name, c) for name, c in terms if name not in fixed) for terms in axes
        )
        target = _strided(
            out, kept_axes, start, kept, [lengths[name] for name in kept], writeable=True
        )
        target += block
    return out


def _windows(a, read, kept, reduced, extents):
    axes, offsets = parse_map(read)
    kept, reduced = _names(kept), _names(reduced)
    view = _strided(a, axes, offsets, kept + reduced, extents)
    return view, kept, reduced


def argmax_view(a, read, kept, reduced, extents):
    """Row-major position of the first maximum of each window (windows: the reduced
    indices, for each value of the kept ones)."""
    view, kept, reduced = _windows(a, read, kept, reduced, extents)
    flat = view.reshape(view.shape[: len(kept)] + (-1,))
    return np.argmax(flat, axis=-1)


def _window_elements(view, index, kept_count, reduced_extents):
    """Indices into ``view`` of each window's element at flat position ``index``."""
    grids = np.ogrid[tuple(slice(0, n) for n in view.shape[:kept_count])]
    return tuple(grids) + np.unravel_index(index, reduced_extents)


def take_view(a, index, read, kept, reduced, extents):
    """Each window's element at the position ``index`` (from ``argmax_view``)."""
    view, kept, reduced = _windows(a, read, kept, reduced, extents)
    return view[_window_elements(view, index, len(kept), view.shape[len(kept) :])]


def route_view(g, index, read, kept, reduced, extents, shape):
    """The adjoint of ``take_view``: zeros of ``shape`` with each element of ``g`` added
    at its window's chosen element.  One step per window position (K_H * K_W for a 2-D
    window), each a strided block of the result."""
    axes, offsets = parse_map(read)
    kept, reduced = _names(kept), _names(reduced)
    lengths = dict(zip(kept + reduced, extents))
    out = np.zeros(tuple(shape), dtype=g.dtype)
    for flat, values in enumerate(itertools.product(*[range(lengths[n]) for n in reduced])):
        fixed = dict(zip(reduced, values))
        start = tuple(
            offset + sum(c * fixed[name] for name, c in terms if name in fixed)
            for terms, offset in zip(axes, offsets)
        )
        kept_axes = tuple(
            tuple((name, c) for name, c in terms if name not in fixed) for terms in axes
        )
        target = _strided(out, kept_axes, start, kept, [lengths[n] for n in kept], writeable=True)
        target += np.where(index == flat, g, 0)
    return out
