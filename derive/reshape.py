"""All-sizes proof of row-major flattening, by the mixed-radix lemma.

Flatten reads ``X[n, e // (W C), (e // C) mod W, e mod C]``: products of sizes, outside
Presburger arithmetic, so isl cannot decide it.  It needs no decision, though: by
Euclidean division, for integers ``W, C >= 1`` the map ``(h, w, c) -> (h W + w) C + c`` is
a bijection from ``[0, H) x [0, W) x [0, C)`` onto ``[0, H W C)``, and its inverse is
exactly that read (the mixed-radix lemma).  So

* the forward tree ``Flatten(x)`` (row-major, C order) is the definition, and
* the chain rule's sum ``dX[n,h,w,c] = sum over e of dF[n,e] [decode(e) = (h,w,c)]`` has
  the one term ``e = (h W + w) C + c``: ``dX = reshape(dF, shape of X)``, row-major.

``statements`` recognises that form (the definition's indices are the row-major decoding
of the input's trailing axes, the trees are ``Flatten`` and ``ReshapeLike``) and states the
lemma as the proof; anything else raises ``NotAffine`` and is left to the sweep.
"""

from __future__ import annotations

import sympy

from derive import ir
from derive.indexsets import NotAffine
from derive.layer import IndexDefinition, Layer


def row_major_digits(e, extents) -> list[sympy.Expr]:
    """The indices whose row-major position over ``extents`` is ``e``."""
    digits = []
    for k, extent in enumerate(extents):
        below = sympy.Mul(*extents[k + 1 :])
        digit = sympy.floor(e / below) if below != 1 else e
        digits.append(digit if k == 0 else sympy.Mod(digit, extent))
    return digits


def statements(layer: Layer):
    from derive.allsizes import Statement, _describe_sizes
    from derive.presburger import Outcome

    definition = layer.definition
    if not isinstance(definition, IndexDefinition) or len(layer.inputs) != 1:
        raise NotAffine("not a reshape of one input")
    (item,) = layer.inputs
    rhs = definition.rhs
    if not isinstance(rhs, sympy.Indexed) or str(rhs.base.label) != item.latex:
        raise NotAffine("not a reshape of one input")
    batch, flat = definition.indices[0], definition.indices[-1]
    expected = (batch, *row_major_digits(flat, item.axes[1:]))
    if len(definition.indices) != 2 or tuple(rhs.indices) != expected:
        raise NotAffine("the definition does not read the row-major decoding of its index")
    forward = dict(layer.forward)[layer.output]
    if forward != ir.Flatten(ir.Operand(item.name)):
        raise NotAffine("the forward tree is not the row-major flattening of the input")
    lemma = (
        "mixed-radix lemma: (h, w, c) -> (hW + w)C + c is a bijection onto [0, HWC) whose "
        "inverse is the definition's index"
    )
    sizes = _describe_sizes(layer, {})
    out = [Statement("forward", sizes, Outcome("proven", details=[lemma]))]
    for gradient in layer.gradients:
        for case in gradient.cases:
            if case.tree != ir.ReshapeLike(ir.Operand(layer.upstream), ir.Operand(item.name)):
                raise NotAffine(f"{gradient.name} is not the row-major reshape of the gradient")
            label = f"{gradient.name} ({case.name})" if case.name else gradient.name
            out.append(Statement(label, sizes, Outcome("proven", details=[lemma])))
    return out
