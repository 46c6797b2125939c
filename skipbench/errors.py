"""The one error type for user mistakes: the CLI shows it as one line and exits with code 1."""


class SkipbenchError(Exception):
    """Bad input from the user (unknown model, invalid cost, missing file, ...)."""
