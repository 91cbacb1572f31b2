"""User-facing errors: the CLI turns these into one line and exit code 2."""


class UserError(ValueError):
    """A mistake in what the user asked for (flag, file, data location); never a bug."""


class DataError(UserError):
    """Data that is missing or unreadable; the message says where data goes."""
