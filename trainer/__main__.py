"""python -m trainer SHARDS_DIR --out RUN_DIR, or torchrun --nproc-per-node=N -m trainer ...

A rank's process entry (trainer/entry.py); nothing imports this module.
"""

import sys

from trainer.entry import main

sys.exit(main())
