"""Errors caused by the user's input. The CLI shows them as one line (no traceback)."""


class UserError(ValueError):
    """Bad input: the message names the key, file or line."""


class ConfigError(UserError):
    """A bad config value or combination; the message names the key(s)."""


class DataError(UserError):
    """A bad data file; the message names the file and line."""
