"""The one error type for user mistakes: the CLI shows it as one line and exits with code 1."""


class SkipbenchError(Exception):
    """Bad input from the user (unknown model, invalid cost, missing file, ...)."""


NOTED: list[str] = []  # what `note` was told in this command, once each, in order
LISTENERS: list = []  # callables given each new note: the CLI prints them (library code never prints)


def note(message: str) -> None:
    """Something the user should know that is not an error (a damaged cache computed again): recorded once per
    command, however many times it is found, and handed to the listeners."""
    if message not in NOTED:
        NOTED.append(message)
        for listen in LISTENERS:
            listen(message)
