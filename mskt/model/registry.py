"""Variants by name. A variant is one class in one file, registered with ``@register("name")``;
``mskt.model.build_model`` builds whichever ``cfg.variant`` names (MMSA's model registry).

A notebook or a user module can register a variant of its own: once its file is imported, every
command, notebook and analysis takes its name, as they ask the model what it reads and rebuilds
(``inputs``, ``fuses``, ``reconstructs``), never its name.
"""

from __future__ import annotations

from mskt.errors import ConfigError


class _Registry(dict):
    """name -> variant class, in registration order. Iterating gives the names (``VARIANTS``)."""

    def __repr__(self) -> str:
        return f"VARIANTS({', '.join(self)})"


VARIANTS = _Registry()


def register(name: str):
    """Class decorator: ``@register("kt_mlp") class KTMLP(KT): ...`` makes ``variant="kt_mlp"`` buildable."""

    def add(cls):
        if name in VARIANTS and _origin(VARIANTS[name]) != _origin(cls):
            # The same class re-registered (a reloaded module, a re-run notebook cell) replaces itself;
            # two different classes under one name would silently shadow each other.
            raise ConfigError(f"variant {name!r} is registered twice: by {_origin(VARIANTS[name])} and by {_origin(cls)}; "
                              "rename one (@register(\"other_name\"))")
        cls.name = name
        VARIANTS[name] = cls
        return cls

    return add


def _origin(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def option_owners(key: str) -> list:
    """The registered variants that own an option named ``key`` (or once named so)."""
    from mskt.model.options import option_names

    return [v for v, cls in VARIANTS.items() if key in option_names(cls.Options)]


def variant_class(name: str):
    if name not in VARIANTS:
        from mskt.plugins import load_entry_points

        load_entry_points()  # an installed package's variant, not imported yet
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"variant={name!r} is not allowed; choose one of {', '.join(VARIANTS)}") from None
