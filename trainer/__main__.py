"""python -m trainer SHARDS_DIR --out RUN_DIR, or torchrun --nproc-per-node=N -m trainer ..."""

import sys

from trainer.main import main

sys.exit(main())
