"""The README's kernel example runs as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_kernel_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "from elbokto_kernels import" in b)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["elbo"].shape == (2,) and scope["hidden"].grad is not None
