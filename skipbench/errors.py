"""The one error type for user mistakes: the CLI shows it as one line and exits with code 1."""


class SkipbenchError(Exception):
    """Bad input from the user (unknown model, invalid cost, missing file, ...)."""


NOTED: set[str] = set()


def note(message: str) -> None:
    """One line on stderr for something the user should know that is not an error (a damaged cache recomputed);
    said once per process, however many times the same thing is found."""
    import os
    import sys

    if os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        return  # under torchrun rank 0 says it (read from the environment: this module sits below `distributed`)
    if message not in NOTED:
        NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)
