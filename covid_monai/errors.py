"""Error types shared by the modules and the command line, and the one line a user reads for an exception."""

from __future__ import annotations

__all__ = ["SharedRunError", "UsageError", "one_line"]


class UsageError(Exception):
    """A bad command line or bad settings given on it (e.g. a bundle override): one line, exit code 2."""


class SharedRunError(RuntimeError):
    """A failure every rank of a distributed run knows about (raised on all of them with the same message)."""


_WRAPPERS = ("applying transform", "Failed to instantiate component", "set '_mode_=debug'")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The most specific message of an exception chain, on one line.

    MONAI wraps errors raised inside transforms ("applying transform ...") and config components ("Failed to
    instantiate component ..."); the root cause is what says which file is wrong and why.

    Args:
        exc: the exception caught.
        limit: maximum length of the message.

    Returns:
        One line of text, never empty.

    Example:
        >>> try:
        ...     raise RuntimeError("applying transform x") from ValueError("scan.nii.gz: not 3D")
        ... except RuntimeError as err:
        ...     one_line(err)
        'scan.nii.gz: not 3D'
    """
    messages = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if text:
            messages.append(text)
        current = current.__cause__ or current.__context__
    useful = [m for m in messages if not m.startswith(_WRAPPERS)]
    return (useful[0] if useful else type(exc).__name__)[:limit]
