"""Attention backend for the decoder copy: xformers where it actually runs, else PyTorch SDPA."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger("lpl_plugin")
_announced: set[str] = set()


def probe_xformers(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """Run xformers' memory-efficient attention once on `device`; whether it worked, and why not if it did not.

    Importability is not enough: xformers imports on CPU-only machines and builds for another PyTorch or CUDA
    import too, then raise NotImplementedError (or worse) on the first call.
    """
    try:
        import xformers.ops
    except Exception as error:  # ImportError, or a broken build raising anything at import
        return False, f"xformers not importable ({type(error).__name__})"
    try:
        q = torch.zeros(1, 8, 1, 8, device=device, dtype=dtype)
        xformers.ops.memory_efficient_attention(q, q, q)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # no kernel for this device, GPU or build: fall back, never fail
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return False, f"xformers installed but unusable here ({type(error).__name__}: {first})"[:200]
    return True, "xformers runs on this GPU"


@functools.lru_cache(maxsize=None)
def xformers_usable(device_type: str, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """Whether xformers' memory-efficient attention runs on this device type (CUDA only), and why not."""
    if device_type != "cuda" or not torch.cuda.is_available():  # not imported: a CPU-only import warns loudly
        installed = importlib.util.find_spec("xformers") is not None
        return False, f"xformers {'installed but ' if installed else 'not installed; it '}needs a CUDA device " \
                      f"(decoder is on {device_type})"
    return probe_xformers(torch.device("cuda"), dtype)


def _attention_modules(module: nn.Module) -> list[nn.Module]:
    """The diffusers Attention layers inside a module."""
    return [m for m in module.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def choose_attention(module: nn.Module, device: torch.device, dtype: torch.dtype,
                     prefer: str = "auto") -> str:
    """Give every attention layer xformers (when usable and not declined) or SDPA; returns the backend name."""
    layers = _attention_modules(module)
    if not layers:
        return "none"
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    usable, reason = xformers_usable(device.type, dtype)
    if prefer != "sdpa" and usable:
        backend, processor = "xformers", XFormersAttnProcessor()
    else:
        backend, processor = "sdpa", AttnProcessor2_0()
        reason = "SDPA requested" if prefer == "sdpa" else reason
    for layer in layers:
        layer.set_processor(processor)
    message = f"LPL decoder attention: {backend} ({reason})"
    if message not in _announced:
        _announced.add(message)
        log.info(message)
    return backend
