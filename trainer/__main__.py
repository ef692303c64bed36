"""python -m trainer SHARDS_DIR --out RUN_DIR, or torchrun --nproc-per-node=N -m trainer ...

A rank's process entry (trainer/entry.py); nothing imports this module.
"""

import signal
import sys

# Importing the entry (torch) takes seconds, with nothing open yet to clean up: a Ctrl-C
# that torchrun passes on then ends the rank at once, not with a traceback from inside
# torch's import on every rank. From `main` on, Ctrl-C unwinds as usual.
signal.signal(signal.SIGINT, signal.SIG_DFL)
from trainer.entry import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
