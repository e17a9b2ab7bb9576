"""The `pipemax` command. Subcommands arrive with the features behind them."""

from __future__ import annotations

import argparse
import platform
import sys


def describe_environment() -> list[str]:
    """Versions and devices, for bug reports and for checking a server before a job."""
    import torch
    import triton

    lines = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"triton {triton.__version__}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append("no CUDA device: kernels run on CPU (torch references, or Triton's interpreter)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipemax", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("env", help="print versions and the devices PipeMax sees")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from pipemax import __version__

        print(__version__)
        return 0
    if args.command == "env":
        print("\n".join(describe_environment()))
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
