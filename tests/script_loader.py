"""Load a file of scripts/ as a module, as tests of the benchmarks and the tutorial's reference model do.

The scripts are run (`python scripts/NAME.py`), not installed, so tests load them by path. Python runs a
script with its own folder first on the module path; `load_script` does the same while the file executes,
so a script finds its sibling modules (scripts/bench_train.py imports scripts/tutorial_model.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A fresh module made from scripts/`name`.py (its module-level settings are its own)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module
