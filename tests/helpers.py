"""Plain helpers several test modules import (``from helpers import script``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def script(name, *args, timeout=300):
    """Run one of the four scripts in a subprocess; assert exit 0 and return its stdout."""
    res = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{name} failed:\n{res.stderr[-3000:]}"
    return res.stdout
