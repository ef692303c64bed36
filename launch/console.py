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
    return cli_main()


def _interrupted_while_starting(signum: int, frame: object) -> None:
    print("shardmf: interrupted; nothing half-written was kept", file=sys.stderr)
    raise SystemExit(INTERRUPTED)
