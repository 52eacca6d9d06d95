"""Old names kept for one release after a rename to the glossary's word (DESIGN.md §8).

An old name still works as the new one and raises a FutureWarning that names the new one:
command-line flags (:func:`renamed_flags`), keyword arguments (:func:`renamed_keywords`), and, with
:func:`warn_renamed`, anything else (a module attribute, an lm-eval model argument).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """The one warning of a renamed name; ``stacklevel`` 3 points at the caller of the function
    that calls this."""
    warnings.warn(
        f"{old} is now {new}; the old name goes in the next release",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed_flags(argv: list[str], renames: dict[str, str]) -> list[str]:
    """``argv`` with each old flag of ``renames`` (``--old`` or ``--old=value``) spelled the new
    way, warning for each."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in renames:
            warn_renamed(flag, renames[flag])
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator: a call passing an old keyword (``step=3``) passes it under its new name
    (``draw_index=3``), with the warning; passing both is a TypeError."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got {old}= and {new}=: pass {new}=")
                    warn_renamed(f"{fn.__qualname__}({old}=)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]  # same signature, plus the old keywords

    return wrap
