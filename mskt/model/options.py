"""Options a variant owns: a small dataclass per variant, next to its class.

The shared :class:`mskt.model.config.ModelConfig` holds what every model shares (the data's shape,
the backbone's widths, depths and dropouts). What only one method needs (kt's loss weights, kt_any's
modality dropout, MCTN's cycle weight) is declared by that variant as its ``Options``::

    @dataclass
    class KTGRUOptions(KT.Options):
        gru_layers: int = option(1, low=(1, "["), help="GRU layers in theta and phi",
                                 search=dict(low=1, high=3))

    @register("kt_gru")
    class KTGRU(KT):
        Options = KTGRUOptions

The run config then takes ``gru_layers`` as a key (``Config.from_dict``, ``config.json``, a notebook's
``overrides``), the CLI as ``--gru-layers``, and ``mskt tune`` searches it over ``search``. Reading it:
``cfg.gru_layers`` (the config answers for the options of its variant).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from mskt.errors import ConfigError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def option(default, *, help: str, low=None, high=None, choices=None, search=None, aliases=()):
    """A variant option: its default, a one-line ``help``, its allowed range (``low``/``high`` as
    ``(value, "[" or "(")``, inclusive or exclusive; None: unbounded) or ``choices``, and where
    ``mskt tune`` searches it: ``search=dict(low=.., high=.., log=True)`` or ``dict(choices=(..))``
    (None: not searched). ``aliases``: earlier names of the option, still read (old config.json files)."""
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, choices=choices, search=search, aliases=aliases))


@dataclass
class Options:
    """No options of its own: the base of every variant's ``Options``."""


@dataclass
class TransferOptions(Options):
    """What every variant that reconstructs a modality through a consistency loss owns."""

    consistency: str = option("l2", choices=("l1", "l2"), help="the consistency loss: l2 (the paper's best) or l1 (its Table 5)",
                              search=dict(choices=("l1", "l2"), why="this paper's Table 5"))


def option_fields(options_cls) -> dict:
    """``{name: dataclasses.Field}`` of an Options class."""
    return {f.name: f for f in dataclasses.fields(options_cls)}


def option_names(options_cls) -> dict:
    """``{name: name, old name: name}``: every key that names an option of ``options_cls``."""
    return {**{name: name for name in option_fields(options_cls)}, **option_aliases(options_cls)}


def option_aliases(options_cls) -> dict:
    """``{old name: name}`` for the options of ``options_cls`` that were renamed."""
    return {old: name for name, f in option_fields(options_cls).items() for old in f.metadata.get("aliases", ())}


def field_kind(f) -> type:
    return _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]


def coerce(key: str, value, type_name) -> object:
    """``value`` as the field's type; strings from a CLI are parsed, anything else must already fit."""
    kind = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, found {value!r}")
    if isinstance(value, bool):  # bool is an int subclass: refuse it where a number is meant
        raise ConfigError(f"{key} must be {kind.__name__}, found {value!r}")
    if kind is int and isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if kind is float and isinstance(value, numbers.Real):  # ints and numpy floats
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} must be a finite float, found {value!r}") from None
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be {kind.__name__}, found {value!r}")


def make_options(options_cls, values: dict, variant: str, check: bool = True):
    """An instance of ``options_cls`` from ``values`` (every key one of its fields), each value
    coerced to its type and (``check``) checked against its range and choices."""
    fields, aliases = option_fields(options_cls), option_aliases(options_cls)
    values = {aliases.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{unknown[0]} is not an option of variant {variant!r}; its options: {', '.join(fields) or 'none'}")
    if not check:  # as given: the config's check() reports a wrong value
        return options_cls(**values)
    made = options_cls(**{k: coerce(k, v, fields[k].type) for k, v in values.items()})
    check_options(made, variant)
    return made


def check_options(opts, variant: str) -> None:
    """Types, finiteness, ranges and choices of every option in ``opts``."""
    ranges = {}
    for name, f in option_fields(type(opts)).items():
        value, meta, kind = getattr(opts, name), f.metadata, field_kind(f)
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{name} (an option of variant {variant!r}) must be {'true or false' if kind is bool else kind.__name__}, found {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, found {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}")
        if meta.get("low") is not None or meta.get("high") is not None:
            ranges[name] = (meta.get("low"), meta.get("high"), "")
    check_ranges(opts, ranges)


def option_help(f) -> str:
    """One line for ``--help``: the option's help, its default and range or choices."""
    meta = f.metadata
    allowed = f"; one of {', '.join(map(str, meta['choices']))}" if meta.get("choices") else ""
    return f"{meta.get('help', '')} (default {f.default!r}{allowed})"


def check_ranges(cfg, ranges: dict) -> None:
    """``ConfigError`` naming the first field of ``cfg`` outside its range in ``ranges``."""
    for name, (low, high, note) in ranges.items():
        value = getattr(cfg, name)
        low_ok = low is None or (value > low[0] if low[1] == "(" else value >= low[0])
        high_ok = high is None or (value < high[0] if high[1] == ")" else value <= high[0])
        if not (low_ok and high_ok):
            raise ConfigError(f"{name} must be in {_interval(low, high)}{note}, found {value!r}")


def _interval(low, high) -> str:
    """``[1, inf)``, ``(0.0, 100.0]``: the allowed range, as the error message prints it."""
    return f"{low[1]}{low[0]}, " + (f"{high[0]}{high[1]}" if high is not None else "inf)")
