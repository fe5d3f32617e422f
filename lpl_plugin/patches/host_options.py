"""A run's options on a host trainer: `--use_lpl` / `--lpl_*` and the loss hooks' options on its parser, the LPL
settings resolved from its parsed arguments, and the check that a run which asked for LPL got it.

Host-neutral: an adapter says how its host is named, where its settings come from, how many timesteps it trains
and which of its functions the loss must go through; the bodies that bind the host's parameters stay in the adapter.
Asked means applied: only a run that asks for LPL is checked (lpl_plugin.patches.asked), and its first backward
stops it with one line when the host's loss never went through the adapter's loss seam.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import UserError, write_lines
from lpl_plugin.settings.preflight import check_training_mapping
from lpl_plugin.settings.schema import add_arguments
from lpl_plugin.training.plugins import DISABLE_OPTION, Plugin, add_plugin_arguments, discover, to_stderr

from lpl_plugin.patches.asked import asks_in, unasked_warning
from lpl_plugin.patches.patcher import Patcher

log = logging.getLogger("lpl_plugin")


class HostOptions:
    """The LPL settings of one run, resolved from the host's arguments, and the third-party loss hooks installed."""

    def __init__(self, host: str, source: str, num_train_timesteps: int):
        self.host, self.source, self.num_train_timesteps = host, source, num_train_timesteps
        self.config: LPLConfig | None = None
        self.plugins: list[Plugin] | None = None

    @property
    def active(self) -> bool:
        """Whether LPL is on for this run (known once the host has read its arguments)."""
        return self.config is not None and self.config.use_lpl

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add --use_lpl / --lpl_* and, when third-party hooks are installed, their options to the host's parser."""
        add_arguments(parser)
        if self.plugins is None:
            self.plugins = discover(to_stderr)
        if self.plugins:
            group = parser.add_argument_group("Loss hooks (lpl-plugin)")
            group.add_argument(f"--{DISABLE_OPTION}", default=None, metavar="NAME[,NAME]",
                               help="turn these third-party loss hooks off for this run (installed: "
                                    f"{', '.join(p.name for p in self.plugins)})")
            self.plugins = add_plugin_arguments(self.plugins, parser, to_stderr)

    def configure(self, args: Any) -> LPLConfig:
        """Resolve the effective settings from the host's parsed arguments (TOML plus command line); ConfigError.

        Whether the run asks for LPL is decided first (lpl_plugin.patches.asked); only a run that asks is checked. One
        that does not keeps LPL off whatever its `lpl_*` values, with at most one warning line.
        """
        values = vars(args)
        if not asks_in(values):
            write_lines(unasked_warning(values))
            self.config = LPLConfig()
            return self.config
        checked = check_training_mapping(values, self.source, num_train_timesteps=self.num_train_timesteps)
        self.config = checked.raise_for_problems()
        if self.active:
            c = self.config
            log.info("lpl-plugin: LPL on (%s): weight %s, t < %s, %d decoder blocks, from optimizer step %d",
                     self.host, c.lpl_weight, c.lpl_t_threshold, c.lpl_num_blocks, c.lpl_start)
        return self.config


class LossSeamCheck:
    """Asked means applied: the run's first backward stops it when its loss did not go through the loss seam."""

    def __init__(self, patcher: Patcher, seam: str, loss_applied: Callable[[], bool],
                 refusal: Callable[[str], UserError]):
        self.patcher, self.seam, self.loss_applied, self.refusal = patcher, seam, loss_applied, refusal
        self._checked = False

    def backward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """accelerator.backward; the first one stops the run when the wrapped loss did not run in this step."""
        if not self._checked:
            self._checked = True
            if not self.loss_applied():
                with self.patcher.reporting():
                    raise self.refusal(f"the first optimizer step's loss did not go through {self.seam}, "
                                       "where LPL is added")
        return original(*args, **kwargs)
