"""Every training process runs the same loss hooks: checked once when they start, before any of their collectives.

The hooks' per-step collectives (the reduction of logged scalars, the agreed guard streak, out-of-memory skips)
take their shape from the hooks registered in each process. A hook installed in one process's environment only, or
one whose import fails in one process (a failed import costs only a warning), would leave the processes waiting in
different collectives forever. So when a run has several processes, each one lists its hooks with the version of
the distribution they come from, the lists are gathered once (one small collective while the models load), and on
any difference every process stops with the same line naming the hooks and the ranks.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch.distributed as dist

from lpl_plugin.settings.errors import write_lines
from lpl_plugin.training.plugins import Plugin
from lpl_plugin.training.ranks import world_size

NOT_RUNNING = "not running"


def hook_versions(names: Iterable[str], plugins: Iterable[Plugin]) -> dict[str, str]:
    """Each running hook's name with the distribution and version it comes from (`lpl`: lpl-plugin's own)."""
    from lpl_plugin import __version__

    where = {plugin.name: plugin.dist for plugin in plugins}
    where["lpl"] = f"lpl-plugin {__version__}"
    return {name: where.get(name, "a hook registered in code") for name in names}


def _ranks(ranks: Sequence[int]) -> str:
    """`rank 3` or `ranks 0, 2`."""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def disagreement(listings: Sequence[Mapping[str, str]]) -> str | None:
    """The one line naming every hook the processes' listings disagree on, and on which ranks; None if they agree."""
    parts = []
    for name in sorted(set().union(*listings)):
        held: dict[str, list[int]] = {}
        for rank, listing in enumerate(listings):
            held.setdefault(listing.get(name, NOT_RUNNING), []).append(rank)
        if len(held) > 1:
            parts.append(f"`{name}` is " + " and ".join(f"{what} on {_ranks(ranks)}" for what, ranks in held.items()))
    if not parts:
        return None
    return (f"lpl-plugin: the training processes would run different loss hooks ({'; '.join(parts)}); install the "
            "same hooks at the same versions in every process's environment (a hook that could not be loaded "
            "says why in a warning above)")


def agree_on_hooks(listing: Mapping[str, str]) -> None:
    """With several processes: gather every process's hooks and stop all of them on a difference (no-op alone)."""
    if world_size() == 1:
        return
    listings: list[dict[str, str]] = [{} for _ in range(world_size())]
    dist.all_gather_object(listings, dict(listing))
    line = disagreement(listings)
    if line is not None:
        stop_every_rank(line)


def stop_every_rank(line: str) -> None:
    """Print `line` and end this process with status 2, once every process has printed it (each calls this).

    The barrier makes sure no process exits before the others have said why: the launcher (torchrun, accelerate)
    ends the remaining processes as soon as the first one exits.
    """
    write_lines([line])
    dist.barrier()
    dist.destroy_process_group()  # a live process group at interpreter exit can abort the process instead
    raise SystemExit(2)
