"""Downloads here, into .whl/, the wheels the GPU machines lack (no network there): the anchors
that gpu_check.py times against, Liger's fused linear cross-entropy and Cut Cross-Entropy.

    python benchmarks/fetch_wheels.py   # then name .whl in the device call's carry

Wheels for the GPU machines' Python (3.12, x86-64 Linux), without their dependencies (torch and
triton are on the machines already); ``benchmarks/gpu_campaign.py`` installs them there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("liger-kernel", "cut-cross-entropy")
PYTHON, PLATFORM = "3.12", "manylinux2014_x86_64"


def main() -> int:
    target = ROOT / ".whl"
    target.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--platform",
            PLATFORM,
            "-d",
            str(target),
            *PACKAGES,
        ],
        check=True,
    )
    print("\n".join(sorted(p.name for p in target.glob("*.whl"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
