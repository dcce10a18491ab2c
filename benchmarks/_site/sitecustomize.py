"""Hide the modules named in ``BENCH_HIDDEN_MODULES`` from this process.

Put on ``PYTHONPATH`` of benchmark contender processes by ``benchmarks/run.py``; see
``benchmarks/isolation.py`` for why.
"""

import os
import sys


class _HiddenModules:
    def __init__(self, names: frozenset) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the benchmark)")
        return None


_names = frozenset(filter(None, os.environ.get("BENCH_HIDDEN_MODULES", "").split(",")))
if _names:
    sys.meta_path.insert(0, _HiddenModules(_names))
