"""The project's scripts as modules: the four scripts at the repository root and the benchmarks
are files, not a package, so the benchmarks and the tests that call their functions load them
from their paths.

    train_rankgrpo = load_script(ROOT / "train_rankgrpo.py")
    train_rankgrpo.main(["--steps", "2"])
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path | str, name: str | None = None) -> ModuleType:
    """The Python file at ``path`` as a module named ``name`` (default: the file's stem), loaded once.

    The module is registered in ``sys.modules`` before its code runs: a dataclass looks its module
    up there while the class is made. A second call with the same name returns the loaded module."""
    path = Path(path)
    name = name or path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
