"""cnnderive: derive CNN backpropagation with SymPy, prove it, generate NumPy, train.

``import cnnderive`` loads nothing else; each entry point below imports what it needs
when it is called.
"""


def derivation(layer, **sizes):
    """The step-by-step derivation of ``layer`` (a name such as "conv2d", or a Layer
    object), which a Jupyter notebook shows as rendered mathematics.  Sizes are the
    keywords of `cnnderive derive` (height=4, stride=2, ...); see
    cnnderive.book.notebook.derivation."""
    from cnnderive.book.notebook import derivation as make

    return make(layer, **sizes)
