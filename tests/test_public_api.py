"""The package's public names resolve to what they say, in any import order."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_install_is_the_function_even_when_another_name_is_imported_first() -> None:
    code = (
        "from celery_langfuse import Installation, install, uninstall\n"
        "assert callable(install) and callable(uninstall), (install, uninstall)\n"
        "assert isinstance(Installation, type)\n"
    )
    # A fresh interpreter: in this one the package is long imported.
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
