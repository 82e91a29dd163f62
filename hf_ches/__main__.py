"""``python -m hf_ches`` is the ``hf-ches`` command (`hf_ches.cli`), for launchers that start a module on every rank:
``torchrun --nproc_per_node 2 -m hf_ches score ...``."""

import sys

from hf_ches.cli import main

if __name__ == "__main__":
    sys.exit(main())
