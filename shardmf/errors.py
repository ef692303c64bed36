"""The one exception type for problems a user can fix (a bad file, value, path or folder)."""


class InputError(ValueError):
    """A user-caused problem: the message names what was found, what was expected and what to do.

    Both packages raise it; the CLI prints it as one line and exits with status 2. Anything
    else is a bug and keeps its traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so cleanup runs as it does for Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C (``signal.signal(SIGTERM, raise_terminated)``)."""
    raise Terminated()
