"""Layers from one equation: parse index notation, derive the adjoint, lower it to NumPy
primitives, and describe the result as an ordinary ``derive.layer.Layer``."""
