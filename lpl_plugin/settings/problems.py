"""Problems in settings: one user mistake per `Problem`, and the ConfigError that lists every one of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from lpl_plugin.settings.errors import UserError

# Problems a ConfigError message lists (all stay in its `problems`); a file of a thousand typos prints a screenful.
MAX_PROBLEMS = 10


@dataclass(frozen=True)
class Problem:
    """One user mistake: where it is, which key, and what is wrong (one line; user text already escaped)."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.message}"


class ConfigError(UserError, ValueError):
    """Raised with every problem found in a config, one line each (the first MAX_PROBLEMS, then a count)."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:MAX_PROBLEMS]]
        if len(self.problems) > MAX_PROBLEMS:
            source = self.problems[MAX_PROBLEMS].source
            lines.append(f"{source + ': ' if source else ''}... and {len(self.problems) - MAX_PROBLEMS} more "
                         "problems; fix these first")
        super().__init__("\n".join(lines))
