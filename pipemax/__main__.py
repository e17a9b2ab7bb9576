"""`python -m pipemax ...`, the same as the `pipemax` command (torchrun -m pipemax ... runs it on every rank)."""

from pipemax.cli import entry

if __name__ == "__main__":
    entry()
