"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class KilnError(Exception):
    """Bad input or an unusable file: the message is meant for the user, no traceback."""


class CheckpointError(KilnError):
    """A weights file that is missing, truncated, unsafe, or of an unknown architecture."""
