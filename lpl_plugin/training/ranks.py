"""Agreement between training processes: every LPL decision that could differ between ranks is taken on all of them.

With a torch.distributed process group up (accelerate or torchrun, NCCL or gloo) these are collectives on small device
tensors; each rank must call the same ones in the same order every step, which the LPL hook and the host adapters do.
With one process every function returns its input unchanged. Nothing here reads a device value on the host except
`agreed_int`, which runs once when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# How a logged scalar combines over processes (see reduce_logs); names not listed average over samples.
PER_GATED_SAMPLE = ("lpl/loss", "lpl/layer/")       # means over the samples LPL applied to
SUMMED = ("lpl/nonfinite_samples", "lpl/nonfinite_steps", "lpl/oom_skips")  # counters of each process
APPLIED = "lpl/applied_fraction"


def world_size() -> int:
    """Number of training processes (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_reduce(value: Tensor, op: "dist.ReduceOp") -> Tensor:
    """A reduced copy of `value` over every process (the value itself with one process)."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def max_over_ranks(value: Tensor) -> Tensor:
    """The element-wise maximum over processes."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def sum_over_ranks(value: Tensor) -> Tensor:
    """The element-wise sum over processes."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def _scalar(value: Tensor | float, device: torch.device | str) -> Tensor:
    """A float32 0-d tensor on `device`; a host number becomes a fill kernel, never a blocking host-to-device copy."""
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=torch.float32)
    return torch.full((), float(value), dtype=torch.float32, device=device)


def drop_if_any(term: Tensor, dropped_here: bool) -> Tensor:
    """`term`, or zeros on every process when any process dropped its term this step (no host read).

    Used for out-of-memory skips: one rank training a step without LPL while the others add it would make the
    processes' gradients disagree in what they mean; all of them drop it instead.
    """
    if world_size() == 1:
        return term
    flag = max_over_ranks(_scalar(1.0 if dropped_here else 0.0, term.device))
    return term * (1.0 - flag).to(term.dtype)


def agreed_int(value: int, device: torch.device | str) -> int:
    """The largest value of a host integer over processes (one collective and one read; at start-up only)."""
    if world_size() == 1:
        return int(value)
    return int(max_over_ranks(torch.tensor(int(value), dtype=torch.int64, device=device)).item())


@dataclass
class Reduced:
    """A logged scalar after reduction over processes: its value and how much it is over (0: nobody logged it)."""

    value: Tensor
    weight: Tensor


def rule(name: str) -> str:
    """How a scalar combines: "gated" (mean over gated samples), "sum" (counters), else "batch" (mean over samples)."""
    if name.startswith(PER_GATED_SAMPLE):
        return "gated"
    return "sum" if name in SUMMED else "batch"


def reduce_logs(logs: Mapping[str, Tensor | float], names: Sequence[str], batch: int,
                device: torch.device | str) -> dict[str, Reduced]:
    """The scalars `names` of every process, combined in one all-reduce of sums of values and counts.

    Every process passes the same `names` (a missing one counts as absent with weight 0), so the collective lines
    up. Means over gated samples are weighted by `lpl/applied_fraction` x batch, other means by the batch size,
    counters are summed, as the demo does.
    """
    gated = _scalar(logs.get(APPLIED, 0.0), device) * batch
    values, weights = [], []
    for name in names:
        kind = rule(name)
        weight = gated if kind == "gated" else _scalar(batch if kind == "batch" else 1, device)
        weight = weight if name in logs else _scalar(0.0, device)
        value = _scalar(logs.get(name, 0.0), device)
        values.append(value if kind == "sum" else value * weight)
        weights.append(weight)
    if not names:
        return {}
    total = sum_over_ranks(torch.stack([torch.stack(values), torch.stack(weights)]))
    out = {}
    for i, name in enumerate(names):
        value, weight = total[0, i], total[1, i]
        if rule(name) != "sum":
            value = torch.where(weight > 0, value / weight.clamp_min(1e-12), torch.zeros_like(value))
        out[name] = Reduced(value, weight)
    return out
