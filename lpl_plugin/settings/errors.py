"""The exceptions for user mistakes: reported as one line per problem, never as a traceback."""

from __future__ import annotations

import sys
from typing import Iterable, NoReturn, TextIO

from lpl_plugin.settings.messages import one_line


class UserError(Exception):
    """A mistake the user can fix (a bad key, file or value); the CLI prints it and exits with status 2."""

    def lines(self) -> list[str]:
        """The message, one problem per line, each safe to print on a terminal."""
        return [one_line(line) for line in str(self).splitlines()] or [type(self).__name__]


class VaeMismatch(UserError, ValueError):
    """The VAE handed to LPL cannot serve the settings (not an AutoencoderKL, or too few decoder blocks)."""


class FileError(UserError):
    """A file or folder the package was asked to read cannot be read safely; one line naming the path."""

    def __init__(self, path: str, reason: str, errno: int | None = None):
        self.path, self.reason, self.errno = path, reason, errno
        super().__init__(f"{path}: {reason}")


class ArgumentError(UserError, ValueError):
    """A Python API call got an argument of the right kind but an unusable value (shape, channels, device)."""


class ArgumentTypeError(UserError, TypeError):
    """A Python API call got an argument of the wrong kind (a dict for a config, None for a VAE, int latents)."""


def write_lines(lines: Iterable[str], stream: TextIO | None = None) -> None:
    """Lines on stderr (or `stream`) in one write, so that the lines of processes sharing it never interleave."""
    text = "".join(f"{line}\n" for line in lines)
    stream = sys.stderr if stream is None else stream
    if text and stream is not None:  # no stderr at all under pythonw
        stream.write(text)
        stream.flush()


HOST_PREFIX = "lpl-plugin"


def from_plugin(lines: Iterable[str]) -> list[str]:
    """Lines printed inside a host process, each saying it comes from lpl-plugin (`lpl-plugin: ` unless it does)."""
    return [line if line.startswith(HOST_PREFIX) else f"{HOST_PREFIX}: {line}" for line in lines]


def exit_refused(lines: Iterable[str]) -> NoReturn:
    """End a host process with status 2 after printing lines, each marked as lpl-plugin's, on stderr in one write."""
    write_lines(from_plugin(lines))
    raise SystemExit(2)
