"""Hypothesis runs derandomized under CI (the ``ci`` profile, chosen when the environment
variable CI is set, as .ci/run sets it): the examples come from a fixed seed, so a failure
in CI fails the same way on any machine.  Elsewhere each run draws new examples."""

from __future__ import annotations

import os

try:
    from hypothesis import settings
except ImportError:  # the tests that need Hypothesis say so themselves
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
