"""The one exception type for problems a user can fix (a bad file, value, path or folder),
and how Ctrl-C and SIGTERM reach the code."""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


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


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM during the block take effect when it ends, not inside it.

    For code that swallows an interrupt and carries on broken: numba, interrupted while it
    imports scipy, leaves numpy half-imported and reports a RecursionError instead, and the
    run went on without its Ctrl-C. The first signal held is sent again after the block,
    to the handler that was there before.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            os.kill(os.getpid(), held[0])
