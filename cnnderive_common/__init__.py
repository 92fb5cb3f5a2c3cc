"""Helpers that every part of cnnderive may import, and that import no part of it.

The parts depend on one another one way, derive -> codegen -> generated -> training,
with the console script (``cnnderive/cli.py``) on top.  What several of them need lives
here, below all of them: writing files atomically (``files``), the error for bad
command-line input and the progress bar of the proofs (``commandline``).
"""
