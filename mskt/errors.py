"""The one exception type for expected failures (bad files, bad options).

The CLI turns an ``MsktError`` into a one-line message and a non-zero exit; anything else
is a bug and keeps its traceback.
"""


class MsktError(Exception):
    """An expected, user-facing error: the message says which file, key and shape."""


class DataError(MsktError):
    """A data file is unreadable, unsafe or inconsistent."""


class ConfigError(MsktError):
    """A configuration key or value is not allowed."""
