"""The built-in variants, one file each, registered by name in the order the paper's tables list
them (``mskt.model.registry.VARIANTS``). Adding one: see ``docs/extending.md``."""

from mskt.model.variants import full, kt, language_vision, language, vision, kt_any, mctn  # noqa: F401 -- registers them
