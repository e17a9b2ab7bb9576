"""`python -m pipemax ...`, the same as the `pipemax` command (torchrun -m pipemax ... runs it on every rank)."""

import sys

from pipemax.cli import main

if __name__ == "__main__":
    sys.exit(main())
