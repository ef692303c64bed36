"""torchrun --nproc-per-node=N -m launch.evaluate_entry RUN_DIR [--k 10 20]: one rank of
`shardmf evaluate --nproc N` (launch/torchrun.py starts it; `evaluate_main` does the work).

An entry point, not a library module: nothing imports it.
"""

import sys

from launch.train_entry import evaluate_main

sys.exit(evaluate_main())
