"""Counting and reporting faults (non-finite values, failed decompositions) without a log flood.

A fault that repeats is logged when its count reaches 1, 2, 4, 8, ... (each line carries the
count so far), so a fault on every step of a long run costs about 20 lines, not one per step.
"""

from __future__ import annotations

import logging

__all__ = ["log_fault"]


def log_fault(logger: logging.Logger, count: int, message: str, *args: object) -> None:
    """Log ``message % args`` with `` (<count> so far)`` appended, if ``count`` is a power of two.

    Args:
        logger: The logger (``WARNING`` level).
        count: How often the fault has happened, including this time (``>= 1``).
        message: ``%``-style format string.
        *args: Its arguments.
    """
    if count >= 1 and count & (count - 1) == 0:
        logger.warning(message + " (%d so far; logged at 1, 2, 4, 8, ...)", *args, count)
