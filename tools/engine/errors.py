"""How the command-line tools report a user error: one line on stderr naming the file or key, exit status 2.

Bad input (a config, a checkpoint, an annotation file, an image, a full disk) raises ``ValueError`` or
``OSError`` with a message that names what is wrong; ``FloatingPointError`` reports divergence. Each tool's
``main()`` catches :data:`USER_ERRORS` and prints :func:`error_line` instead of a traceback.

Example::

    try:
        run_from_args(...)
    except USER_ERRORS as e:
        return report(e)
"""
from __future__ import annotations

import sys

__all__ = ["USER_ERRORS", "error_line", "report"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)

# What torch's DataLoader puts in front of an exception re-raised from a worker process.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message: only the
    original message is kept. A message of several lines is joined into one.
    """
    message = str(error)
    if _WORKER_TRACEBACK in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        # The worker's last line is "ExceptionType: message".
        message = last.split(": ", 1)[1] if ": " in last and not last.startswith(" ") else last
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    joined = lines[0]
    for line in lines[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line
    return joined


def report(error: BaseException) -> int:
    """Print ``error: <message>`` on stderr as one line; returns 2, the exit status of a usage error.

    Progress bars the error interrupted are closed first, so that the message starts a line of its own.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {error_line(error)}", file=sys.stderr)
    return 2
