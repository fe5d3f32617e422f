"""Command-line argument types shared by every command: bounded numbers, booleans, one-line parser errors."""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

from lpl_plugin.settings.messages import one_line, shorten, show_value

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
# Longest argparse error line printed (it can quote a user's argument).
MAX_ERROR = 300


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one escaped line ending in where to find the usage (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` as one line and exit with status 2."""
        line = one_line(shorten(f"{self.prog}: error: {message}", MAX_ERROR))
        self.exit(2, f"{line} (see {self.prog} --help)\n")


def integer(text: str) -> int:
    """An argparse type: an integer (bounds are checked by its reader), else an error quoting the text safely."""
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {show_value(text)}") from None


def number(text: str) -> float:
    """An argparse type: a finite number (bounds are checked by its reader), else an error quoting the text safely."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {show_value(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {show_value(text)}")
    return value


def bounded_int(low: int, high: int, *, multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (and a multiple of `multiple_of`), else a one-line error."""
    def parse(text: str) -> int:
        value = integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {show_value(value)}")
        if value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}")
        return value
    parse.__name__ = f"integer {low}..{high}"
    return parse


def parse_bool(text: str) -> bool:
    """A command-line boolean: true/false, 1/0, yes/no, on/off."""
    lowered = str(text).strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {show_value(text)}")
