"""The one error type that solotune raises for anything the user can fix."""


class SolotuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The CLI prints the message alone (no traceback) and exits with status 2.
    """
