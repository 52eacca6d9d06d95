"""The ``elbokto`` command line.

    elbokto selfcheck   every kernel backend against the float64 oracle
    elbokto demo        the main job on the embedded default (for now: the kernel self-check)
"""

from __future__ import annotations

import argparse
import sys


def _selfcheck(_args) -> int:
    from elbokto_kernels.selfcheck import run
    return 0 if run() else 1


COMMANDS = {
    "selfcheck": (_selfcheck, "check every kernel backend against the float64 oracle"),
    "demo": (_selfcheck, "run the embedded default job (the kernel self-check until the trainer "
                         "lands)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elbokto", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
