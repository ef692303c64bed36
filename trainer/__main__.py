"""python -m trainer SHARDS_DIR --out RUN_DIR, or torchrun --nproc-per-node=N -m trainer ...

An entry point, not a library module: nothing imports it. Its flags come from the flag
engine in ``launch`` (which builds the flags of both packages); no module of the
``trainer`` library imports ``launch``, so this makes no import circle.
"""

import sys

from launch.train_entry import main

sys.exit(main())
