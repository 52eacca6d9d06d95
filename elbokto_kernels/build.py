"""Builds the "cpu" backend's C++ kernel ahead of its first use (which would otherwise compile it,
a minute or more, once per machine and version):

    python -m elbokto_kernels.build

Prints the library's path; exits 1 with the reason when it does not build (then "auto" runs the
torch path on CPU)."""

from __future__ import annotations

import sys

from elbokto_kernels.backends import cpu


def main() -> int:
    try:
        print(f"elbokto: the C++ CPU kernel is ready: {cpu.library()}")
    except RuntimeError as err:
        print(f"elbokto: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
