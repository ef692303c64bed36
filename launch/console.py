"""The ``shardmf`` console script: `launch.cli.main`, with Ctrl-C covered from the start.

Importing the command line takes a tenth of a second, before `launch.cli.main` can catch
anything: a Ctrl-C then would print a traceback from inside some import. Until the
import is done, Ctrl-C ends the process here, with the same line and status as later
(nothing has been written yet).
"""

import signal
import sys

INTERRUPTED = 130


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from launch.cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = cli_main()
    # Done: the interpreter's teardown puts the default handlers back, and a Ctrl-C there
    # would end the process by the signal instead of with the command's status.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def _interrupted_while_starting(signum: int, frame: object) -> None:
    print("shardmf: interrupted; nothing half-written was kept", file=sys.stderr)
    raise SystemExit(INTERRUPTED)
