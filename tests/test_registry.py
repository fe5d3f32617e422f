"""The loss-hook registry: names, signature checks, keyword calls and entry-point discovery."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from lpl_plugin import HookRegistry, HookResult, LossContext
from lpl_plugin.training.plugins import HostContext, load_plugin_hooks
from lpl_plugin.training.registry import HookError


def context(batch=3, **changes):
    """A LossContext with random tensors."""
    z = torch.randn(batch, 4, 4, 4)
    fields = dict(latents=z, noisy_latents=z, timesteps=torch.arange(batch), model_pred=z, target=z)
    fields.update(changes)
    return LossContext(**fields)


def test_register_call_with_keywords_and_sum():
    seen = {}
    registry = HookRegistry()

    def first(latents, step):
        seen["first"] = step
        return torch.ones(latents.shape[0])

    def second(**fields):
        seen["second"] = sorted(fields)
        return HookResult(torch.full((fields["latents"].shape[0],), 2.0), {"x/value": 1.0})

    registry.register("first", first)
    registry.register("second", second)
    applied = registry.apply(context(step=7))
    assert torch.equal(applied.loss, torch.full((3,), 3.0)) and applied.logs == {"x/value": 1.0}
    assert seen["first"] == 7 and "alphas_cumprod" in seen["second"]
    assert list(registry) == ["first", "second"] and "first" in registry and len(registry) == 2


def test_duplicates_rejected_listing_registered():
    registry = HookRegistry()
    registry.register("a", lambda latents: None)
    registry.register("b", lambda latents: None)
    with pytest.raises(HookError, match=r"'a' is already registered \(registered: a, b\)"):
        registry.register("a", lambda latents: None)
    registry.register("a", lambda step: None, replace=True)
    registry.unregister("a")
    with pytest.raises(HookError, match="no hook named 'a'"):
        registry.unregister("a")


def test_signature_checked_at_registration():
    registry = HookRegistry()
    with pytest.raises(HookError, match="asks for lattents"):
        registry.register("typo", lambda lattents: None)
    with pytest.raises(HookError, match="passable by keyword"):
        registry.register("positional", lambda *args: None)
    with pytest.raises(HookError, match="non-empty string"):
        registry.register("", lambda latents: None)


def test_bad_result_shape_is_reported():
    registry = HookRegistry()
    registry.register("scalar", lambda latents: latents.mean())
    with pytest.raises(HookError, match=r"shape \(\); expected one value per sample \(3,\)"):
        registry.apply(context())


def test_entry_point_hooks_start_with_the_host_context(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_hook.py"
    package.write_text(textwrap.dedent('''
        def make_hook(host):
            if not host.args.get("double_mean"):
                return None
            return lambda latents: latents.flatten(1).mean(1) * 2
    '''))
    dist = tmp_path / "thirdparty_hook-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-hook\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lpl_plugin.hooks]\ndouble_mean = thirdparty_hook\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    warnings: list[str] = []
    registry = HookRegistry()
    assert load_plugin_hooks(registry, HostContext(args={"double_mean": False}), warn=warnings.append) == []
    assert load_plugin_hooks(registry, HostContext(args={"double_mean": True}), warn=warnings.append) == \
        ["double_mean"]
    ctx = context()
    torch.testing.assert_close(registry.apply(ctx).loss, ctx.latents.flatten(1).mean(1) * 2)
    assert warnings == []
    sys.modules.pop("thirdparty_hook", None)
