"""One config dataclass per script; the command line is derived from it.

Every field carries its documentation in ``metadata["help"]`` (use ``arg``), which becomes
the ``--help`` text. Field ``learning_rate`` becomes ``--learning-rate``; a ``bool`` field
becomes ``--flag`` / ``--no-flag``; a ``list``/``tuple`` field takes several values.
The resolved config is written to the run directory as JSON (``save_config``).

    @dataclass
    class Config:
        lr: float = arg(1e-6, "Learning rate.")
        steps: int = arg(100, "Optimiser steps.")

    cfg = parse_config(Config, ["--lr", "5e-7"])   # Config(lr=5e-07, steps=100)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from rankgrpo.io import atomic_write_json

T = TypeVar("T")


def arg(default: Any, help: str, **kwargs) -> Any:
    """A documented dataclass field (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, tuple)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(tp) -> tuple[type, bool, bool]:
    """(element type, is_sequence, is_optional) for the simple annotations we allow."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _parser_for(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        tp, is_seq, optional = _base_type(hints[f.name])
        if tp is bool and not is_seq:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        conv = tp if tp in (int, float, str) else str
        kwargs: dict = {"dest": f.name, "default": default, "help": help_text, "type": conv}
        if is_seq:
            kwargs["nargs"] = "*"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build ``cls`` from command-line arguments (``argv=None`` reads ``sys.argv``)."""
    ns = _parser_for(cls, description).parse_args(argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _, is_seq, _ = _base_type(hints[f.name])
        if is_seq and isinstance(values[f.name], list) and typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = tuple(values[f.name])
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, run_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config into the run directory (atomic)."""
    path = Path(run_dir) / name
    atomic_write_json(path, config_to_dict(cfg))
    return path


def load_config(cls: type[T], path: str | Path) -> T:
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
