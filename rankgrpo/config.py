"""One config dataclass per script; the command line is derived from it.

Every field carries its documentation in ``metadata["help"]`` (use ``arg``), which becomes
the ``--help`` text. Field ``learning_rate`` becomes ``--learning-rate``; a ``bool`` field
becomes ``--flag`` / ``--no-flag``; a ``list``/``tuple`` field takes several values.
The resolved config is written to the run directory as JSON (``save_config``).

Numeric fields declare their bounds in ``arg(..., min=, max=, above=)`` (``min``/``max``
inclusive, ``above`` exclusive); ``parse_config`` checks them on every value, given or
default, and a bad value or an unknown flag is one line on stderr that names the flag.
The value 0 means the same thing wherever a flag name recurs: ``*_every`` 0 is off, and a
limit or cap 0 is "no limit".

Presets: a config class with a ``preset`` field and a ``PRESETS`` class attribute (preset name ->
{field: value}) takes the chosen preset's values as the defaults of those flags; a flag given on
the command line wins, and ``--help`` shows the chosen preset's defaults. A config built in Python
(``Config(...)``) gets the dataclass defaults: presets belong to the command line.

    @dataclass
    class Config:
        lr: float = arg(1e-6, "Learning rate.", min=0)
        steps: int = arg(100, "Optimiser steps.", min=1)

    cfg = parse_config(Config, ["--lr", "5e-7"])   # Config(lr=5e-07, steps=100)
    parse_config(Config, ["--steps", "-3"])        # SystemExit: error: --steps must be >= 1, got -3
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from rankgrpo.io import InputFileError, atomic_write_json

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad command-line value; the message names the flag."""


def flag_name(field_name: str) -> str:
    """'eval_every' -> '--eval-every'."""
    return "--" + field_name.replace("_", "-")


def arg(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        above: float | None = None, **kwargs) -> Any:
    """A documented dataclass field (mutable defaults are copied per instance).

    min / max: inclusive bounds of a numeric value; above: exclusive lower bound.
    """
    kwargs.update({k: v for k, v in (("min", min), ("max", max), ("above", above)) if v is not None})
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ``ConfigError`` (one line), not usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def _parser_for(cls: type, description: str | None = None,
                defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser of ``cls``; ``defaults`` (a preset's values) replace the dataclass defaults."""
    parser = _Parser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        flag = flag_name(f.name)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.name in defaults:
            default = defaults[f.name]
        else:
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
    """Build ``cls`` from command-line arguments (``argv=None`` reads ``sys.argv``).

    A bad flag or value raises ``SystemExit("error: ...")``: one line naming the flag.
    """
    try:
        return _parse_config(cls, argv, description)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def preset_defaults(cls: type, argv: Sequence[str]) -> dict[str, Any]:
    """The values of the preset that ``argv`` chooses (``--preset NAME``, else the ``preset``
    field's default) for a class with ``PRESETS``; {} for a class without presets, or for an
    unknown name (the full parse then refuses it, naming the choices).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     PRESETS = {"small": {"steps": 3}, "big": {"steps": 300}}
    ...     preset: str = arg("small", "Preset.", choices=["small", "big"])
    ...     steps: int = arg(10, "Steps.")
    >>> preset_defaults(C, []), preset_defaults(C, ["--preset", "big"]), preset_defaults(C, ["--preset=none"])
    ({'steps': 3}, {'steps': 300}, {})
    >>> parse_config(C, ["--preset", "big"]).steps, parse_config(C, ["--preset", "big", "--steps", "5"]).steps
    (300, 5)
    """
    presets = getattr(cls, "PRESETS", None)
    if not presets:
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=fields["preset"].default)
    chosen = pre.parse_known_args(list(argv))[0].preset
    values = dict(presets.get(chosen, {}))
    unknown = set(values) - set(fields)
    if unknown:  # a mistake in the code, not in the command line
        raise KeyError(f"preset {chosen!r} of {cls.__name__} sets unknown field(s) {sorted(unknown)}")
    return values


def _parse_config(cls, argv, description):
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser_for(cls, description, preset_defaults(cls, argv)).parse_args(argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _, is_seq, _ = _base_type(hints[f.name])
        if is_seq and isinstance(values[f.name], list) and typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = tuple(values[f.name])
    cfg = cls(**values)
    check_bounds(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def check_bounds(cfg) -> None:
    """Raise ``ConfigError`` naming the flag of the first field outside its declared bounds.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     temperature: float = arg(1.0, "Sampling temperature.", above=0)
    >>> check_bounds(C(temperature=0.0))
    Traceback (most recent call last):
    ...
    rankgrpo.config.ConfigError: --temperature must be > 0, got 0.0
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if value != value:  # NaN passes every comparison
            raise ConfigError(f"{flag_name(f.name)} must be a number, got {value}")
        m = f.metadata
        if "min" in m and value < m["min"]:
            raise ConfigError(f"{flag_name(f.name)} must be >= {m['min']}, got {value}")
        if "above" in m and value <= m["above"]:
            raise ConfigError(f"{flag_name(f.name)} must be > {m['above']}, got {value}")
        if "max" in m and value > m["max"]:
            raise ConfigError(f"{flag_name(f.name)} must be <= {m['max']}, got {value}")


def run_cli(config_cls: type[T], run: Callable[[T], int], argv: Sequence[str] | None = None) -> int:
    """Parse ``config_cls`` from ``argv`` and call ``run(cfg)``. Input the user can fix (a bad flag,
    a missing or malformed file, a bad row or catalog) ends with ONE line ``error: ...`` on stderr
    and exit status 2, never a traceback; anything else is a bug and keeps its traceback.

    The expected errors: ``ConfigError``, ``rankgrpo.io.InputFileError`` (and its subclasses
    ``rankgrpo.data.DataError`` and ``rankgrpo.catalog.CatalogError``), and ``SystemExit``
    carrying a message.
    """
    try:
        return run(parse_config(config_cls, argv))
    except (ConfigError, InputFileError) as e:
        message = str(e)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise  # --help, or a status chosen on purpose
        message = str(e.code)
    message = " ".join(message.split())  # one line, whatever the message held
    if message.startswith("error: "):
        message = message[len("error: "):]
    print(f"error: {message}", file=sys.stderr)
    return 2


def to_flags(values: dict[str, Any]) -> list[str]:
    """Command-line flags that set ``values`` (field name -> value), ``parse_config``'s inverse:
    a bool is ``--flag`` / ``--no-flag``, a list or tuple its items after the flag.

    >>> to_flags({"lr": 0.001, "title_tokens": True, "tie_embeddings": False, "arms": ["a", "b"]})
    ['--lr', '0.001', '--title-tokens', '--no-tie-embeddings', '--arms', 'a', 'b']
    """
    flags: list[str] = []
    for name, value in values.items():
        flag = flag_name(name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, run_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config into the run directory (atomic)."""
    path = Path(run_dir) / name
    atomic_write_json(path, config_to_dict(cfg))
    return path
