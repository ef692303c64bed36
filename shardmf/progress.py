"""When to draw progress bars: on a terminal, and only when progress lines are wanted.

A bar redrawn with carriage returns suits a terminal and nothing else: in a log file
(stderr redirected) it leaves fragments such as ``epoch 7:   0%| 0.00/542k``, so there
the per-epoch log lines are the progress. A caller that silenced a package's INFO lines
(``verbose=False``, or a logger set to WARNING) wants no bars either.
"""

from __future__ import annotations

import logging
import sys


def bars_wanted(logger: logging.Logger) -> bool:
    """Whether to draw a progress bar for work that ``logger`` reports on."""
    return sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)
