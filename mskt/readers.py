"""Kept for users' notebooks: the readers live in ``mskt.data.readers``."""

from mskt.data.readers import load_dataset  # noqa: F401
