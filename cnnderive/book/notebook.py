"""A derivation that Jupyter shows as rendered mathematics: ``cnnderive.derivation("conv2d")``.

The object carries the derivation's blocks (derive.report) and gives them to a notebook
as Markdown with ``$...$`` and ``$$...$$`` math, which every Jupyter front end typesets;
as LaTeX for conversion to a document (nbconvert's LaTeX and PDF exports prefer it); and
as plain text where neither is shown.
"""

from __future__ import annotations

import argparse
import re

from derive import report
from derive.layer import Layer


class Derivation:
    """The step-by-step derivation of one layer's gradients at one configuration."""

    def __init__(self, layer: Layer, config) -> None:
        self.layer = layer
        self.config = dict(config)
        self.blocks = report.derivation(layer, self.config)

    @property
    def proven(self) -> bool:
        """Whether every closed form held on this configuration."""
        return not any(b.kind == "text" and b.text.startswith("FAILED") for b in self.blocks)

    def to_text(self) -> str:
        return report.to_text(self.blocks)

    def to_latex(self, standalone: bool = False) -> str:
        return report.to_latex(self.blocks, standalone=standalone)

    def to_markdown(self) -> str:
        lines = []
        for number, block in enumerate(self.blocks):
            if block.kind == "heading":
                lines.append(("## " if number == 0 else "### ") + block.text)
            elif block.kind == "text":
                lines.append(_markdown_prose(block.latex))
            else:
                lines.append("$$\n" + block.latex + "\n$$")
            lines.append("")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_latex_(self) -> str:
        return self.to_latex()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"<Derivation of {self.layer.name} on {self.layer.describe(self.config)}>"


def _markdown_prose(text: str) -> str:
    """Prose for Markdown: $...$ and `...` kept, Markdown's emphasis characters escaped."""
    pieces = []
    for part in re.split(r"(\$[^$]+\$|`[^`]+`)", text):
        if part.startswith(("$", "`")) and len(part) > 1:
            pieces.append(part)
        else:
            pieces.append(re.sub(r"([\\*_\[\]<>#|])", r"\\\1", part))
    return "".join(pieces)


def derivation(layer: str | Layer, **sizes: int) -> Derivation:
    """The derivation of ``layer`` (a catalogue name such as "conv2d", or any Layer
    object, an equation layer for instance) at its worked example, or at the sizes given
    by the keywords of `cnnderive derive` (height=4, stride=2, ...).

    Raises ValueError for an unknown layer or size, or sizes the layer does not accept."""
    from cnnderive.cli import UsageError
    from derive import cli as derive_cli
    from derive.layers import LAYERS

    if isinstance(layer, str):
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of: {', '.join(LAYERS)}")
        layer = LAYERS[layer]
    unknown = sorted(set(sizes) - set(derive_cli.SIZE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown size {unknown[0]!r}; the sizes are: {', '.join(derive_cli.SIZE_OPTIONS)}"
        )
    try:
        config = derive_cli.configuration_from(layer, argparse.Namespace(**sizes))
    except UsageError as error:
        raise ValueError(str(error)) from None
    return Derivation(layer, config)
