"""pip constraints that pin every runtime requirement of setup.cfg at its declared floor.

    python scripts/min_constraints.py setup.cfg > constraints.txt   # what `make test-min` runs

setup.cfg's `install_requires` is the one place the floors are written; `make test-min` installs
exactly these versions and runs the unit tests on them, so a floor that the code outgrows fails
there. A requirement without a `>=` floor is an error: its lowest version would be untested.
"""
from __future__ import annotations

import configparser
import re
import sys

FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def floor_pin(requirement: str) -> str:
    """`name==floor` for a requirement `name>=floor[,...]`.

    >>> floor_pin("transformers>=4.57.1,<6")
    'transformers==4.57.1'
    >>> floor_pin("torch >= 2.13")
    'torch==2.13'
    >>> floor_pin("tqdm")
    Traceback (most recent call last):
    ...
    ValueError: 'tqdm' has no '>=' floor
    """
    match = FLOOR.match(requirement)
    if not match:
        raise ValueError(f"cannot read requirement {requirement!r}")
    name, specifiers = match.groups()
    floors = re.findall(r">=\s*([^,;\s]+)", specifiers)
    if len(floors) != 1:
        raise ValueError(f"{requirement.strip()!r} has no '>=' floor" if not floors
                         else f"{requirement.strip()!r} has several '>=' floors")
    return f"{name}=={floors[0]}"


def install_requires(setup_cfg: str) -> list[str]:
    """The non-empty, non-comment lines of [options] install_requires."""
    config = configparser.ConfigParser()
    if not config.read(setup_cfg):
        raise FileNotFoundError(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def main(argv: list[str]) -> int:
    setup_cfg = argv[1] if len(argv) > 1 else "setup.cfg"
    print("\n".join(floor_pin(r) for r in install_requires(setup_cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
