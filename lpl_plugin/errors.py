"""The exception for user mistakes: reported as one line per problem, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a bad key, file or value); the CLI prints it and exits with status 2."""

    def lines(self) -> list[str]:
        """The message, one problem per line."""
        return str(self).splitlines() or [type(self).__name__]


class VaeMismatch(UserError, ValueError):
    """The VAE handed to LPL cannot serve the settings (not an AutoencoderKL, or too few decoder blocks)."""
