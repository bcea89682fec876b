"""System programs the tests drive for real (Debian packages installed by ``scripts/test``).

``require(name)`` returns the program's path. When it is missing the test is skipped with the
reason, except under ``CI=true``, where a missing program fails the test: CI must never pass by
skipping what it was meant to check.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(program: str) -> str:
    path = shutil.which(program)
    if path is not None:
        return path
    message = f"{program} is not installed (scripts/test installs it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
