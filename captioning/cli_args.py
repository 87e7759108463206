"""argparse types every command-line tool shares, so a number out of range is refused the same way everywhere.

A type that raises ``argparse.ArgumentTypeError`` makes argparse name the flag, print the usage and
exit with status 2 before anything loads. ``float("nan")`` parses, so float flags check finiteness
here: a NaN compares False with every bound and would otherwise pass any range check.
This module imports only the standard library: ``captioning --help`` stays fast.
"""

import argparse
import math
from collections.abc import Callable

EXIT_STATUS_HELP = ("exit status: 0 done; 1 done, but some inputs were skipped or failed (each named on stderr); "
                    "2 usage or input error (the message names the flag or file), found before the work starts "
                    "where it can be")


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{lowest}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_between(lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``lowest`` to ``highest``, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lowest} to {highest}, got {text!r}"
                                             ) from None
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"must be from {lowest} to {highest}, got {value}")
        return value

    parse.__name__ = f"int_between_{lowest}_{highest}"
    return parse


port = int_between(0, 65535)  # a TCP port; 0: any free one


def _finite_float(text: str, bound: str, accept: Callable[[float], bool]) -> float:
    """``text`` as a finite number that ``accept``s, else the ``ArgumentTypeError`` saying it must be ``bound``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}") from None
    if not math.isfinite(value) or not accept(value):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (no NaN, no infinity)."""
    return _finite_float(text, ">= 0", lambda value: value >= 0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a size limit, say: 0 would refuse everything)."""
    return _finite_float(text, "> 0", lambda value: value > 0)
