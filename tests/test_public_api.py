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


def test_install_is_the_function_after_the_private_module_is_imported() -> None:
    """The handlers live in ``celery_langfuse._install``: no submodule is called
    ``install``, so importing the module (as the CLI and the pytest plugin do) never
    rebinds the package's ``install``."""
    code = (
        "import celery_langfuse, celery_langfuse._install, celery_langfuse.cli\n"
        "from celery_langfuse import install\n"
        "assert callable(install) and install is celery_langfuse._install.install, install\n"
        "assert celery_langfuse.install is install\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
