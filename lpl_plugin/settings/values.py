"""Values read the command line's way: argument types shared by every command (bounded numbers, booleans,
one-line parser errors), and the same rules for option values given as strings (GUIs write every value as one)."""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Callable, NoReturn

from lpl_plugin.settings.messages import one_line, shorten, show_value, type_name

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


# -- option values, as settings read them ------------------------------------------------------------------------

def described(value: Any) -> str:
    """'got VALUE (TYPE)' for a message."""
    return f"got {show_value(value)} ({type_name(value)})"


def as_bool(value: Any) -> bool | None:
    """A bool option's value as a bool: a bool, or a string of the command line's true/false words; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    return None


def _from_text(value: str, kind_: str) -> int | float | None:
    """A number option given as a string (GUIs write every value as one), read as the command line reads it."""
    try:
        return integer(value) if kind_ == "int" else float(value)
    except (argparse.ArgumentTypeError, ValueError):
        return None


def as_number(value: Any, kind_: str) -> int | float | None:
    """An int or float option's value as a Python number (numpy and torch scalars, and strings that read as one under
    the command line's rules, included), or None."""
    if isinstance(value, str):
        return _from_text(value, kind_)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if kind_ == "int":
        if not isinstance(value, numbers.Integral):
            return None
        return int(value)
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return None
