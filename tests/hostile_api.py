"""Worker for tests/test_hostile.py: runs the catalogue's Python API cases in one process, one JSON line each.

Usage: python tests/hostile_api.py CASES.json (run from the catalogue's working copy). Each case is
{"name", "runner", "file", "api"}; the output line says what the call raised: its type, the names of every class
it derives from, and its message (or that it returned normally, which is a failure).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable

CASES: dict[str, Callable[[], Any]] = {}


def case(function: Callable[[], Any]) -> Callable[[], Any]:
    """Register an API case under its function name."""
    CASES[function.__name__] = function
    return function


# -- LPLConfig and the mapping readers ----------------------------------------------------------------------------

@case
def config_loss_type_l2():
    from lpl_plugin import LPLConfig
    return LPLConfig(lpl_loss_type="l2")


@case
def config_weight_nan():
    from lpl_plugin import LPLConfig
    return LPLConfig(lpl_weight=float("nan"))


@case
def config_chunk_zero():
    from lpl_plugin import LPLConfig
    return LPLConfig(lpl_chunk_size=0)


@case
def config_weight_string():
    from lpl_plugin import LPLConfig
    return LPLConfig(lpl_weight="1.5kg")  # "1.5" is the number 1.5 (GUIs type numbers as strings)


@case
def config_blocks_bool():
    from lpl_plugin import LPLConfig
    return LPLConfig(lpl_num_blocks=True)


@case
def config_all_wrong():
    from lpl_plugin import LPLConfig
    return LPLConfig(use_lpl=1, lpl_weight=-1, lpl_t_threshold=0, lpl_loss_type=None, lpl_norm_type=[],
                     lpl_pow_law="yes please", lpl_num_blocks=9, lpl_remove_outliers=0, lpl_scale=None,
                     lpl_snr_gamma=float("inf"), lpl_start=-5, lpl_compat="x", lpl_dtype="fp8",
                     lpl_grad_mode={}, lpl_chunk_size=2 ** 80, lpl_checkpointing=1, lpl_max_bad_steps=1.5)


@case
def replace_unknown():
    from lpl_plugin import LPLConfig
    return LPLConfig().replace(lpl_wieght=1.0)


@case
def dataclasses_replace():
    import dataclasses

    from lpl_plugin import LPLConfig
    return dataclasses.replace(LPLConfig(), lpl_weight=1e300)


@case
def from_mapping_none():
    from lpl_plugin import LPLConfig
    return LPLConfig.from_mapping(None)


@case
def from_mapping_int_key():
    from lpl_plugin import LPLConfig
    return LPLConfig.from_mapping({3: 1, "use_lpl": True})


@case
def from_mapping_int_key_in_table():
    from lpl_plugin import LPLConfig
    return LPLConfig.from_mapping({"lpl": {7: 1}})


@case
def from_mapping_list():
    from lpl_plugin import LPLConfig
    return LPLConfig.from_mapping([("use_lpl", True)])


@case
def mapping_deep():
    from lpl_plugin import check_training_mapping
    data: dict[str, Any] = {}
    node = data
    for _ in range(10000):
        node["a"] = {}
        node = node["a"]
    return check_training_mapping({"use_lpl": True, "x": data}, "api").raise_for_problems()


@case
def mapping_cyclic():
    from lpl_plugin import check_training_mapping
    data: dict[str, Any] = {"use_lpl": True}
    data["self"] = data
    return check_training_mapping(data, "api").raise_for_problems()


@case
def mapping_huge_host_int():
    from lpl_plugin import check_training_mapping
    flat = {"use_lpl": True, "lpl_start": 5, "max_train_steps": -10 ** 5000}
    return check_training_mapping(flat, "api").raise_for_problems()


@case
def config_path_nul():
    from lpl_plugin import check_training_config
    return check_training_config("configs/a\x00b.toml").raise_for_problems()


# -- GUI helpers --------------------------------------------------------------------------------------------------

@case
def render_table_injection():
    from lpl_plugin import render_toml
    return render_toml(table="lpl]\nlpl_weight = 100\n[x")


@case
def render_table_option_name():
    from lpl_plugin import render_toml
    return render_toml(table="lpl_weight")


@case
def render_table_int():
    from lpl_plugin import render_toml
    return render_toml(table=3)


@case
def render_config_dict():
    from lpl_plugin import render_toml
    return render_toml({"use_lpl": True})


@case
def launch_accelerate_string():
    from lpl_plugin import launch_command
    return launch_command("sdxl_train.py", "c.toml", "--num_processes 1")


@case
def launch_extra_string():
    from lpl_plugin import launch_command
    return launch_command("sdxl_train.py", "c.toml", None, extra_args="--lpl_weight 2")


@case
def launch_script_none():
    from lpl_plugin import launch_command
    return launch_command(None, "c.toml")


# -- the engine's arguments ---------------------------------------------------------------------------------------

def _vae():
    """A tiny real AutoencoderKL (4 latent channels)."""
    from lpl_plugin.engine.tiny import tiny_vae
    return tiny_vae()


def _loss():
    """The engine on the tiny VAE."""
    from lpl_plugin import LatentPerceptualLoss, LPLConfig
    return LatentPerceptualLoss(_vae(), LPLConfig(use_lpl=True, lpl_num_blocks=1))


def _latents(*shape, dtype=None):
    import torch
    return torch.zeros(*shape) if dtype is None else torch.zeros(*shape, dtype=dtype)


@case
def loss_vae_none():
    from lpl_plugin import LatentPerceptualLoss
    return LatentPerceptualLoss(None)


@case
def loss_vae_linear():
    import torch
    from lpl_plugin import LatentPerceptualLoss
    return LatentPerceptualLoss(torch.nn.Linear(4, 4))


@case
def loss_vae_no_parameters():
    import torch
    from lpl_plugin import LatentPerceptualLoss

    class Hollow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            self.decoder.mid_block = torch.nn.Identity()
            self.decoder.up_blocks = torch.nn.ModuleList()
    return LatentPerceptualLoss(Hollow())


@case
def loss_config_dict():
    from lpl_plugin import LatentPerceptualLoss
    return LatentPerceptualLoss(_vae(), {"use_lpl": True})


@case
def hook_config_dict():
    from lpl_plugin import LPLHook
    return LPLHook(_vae(), {"use_lpl": True})


@case
def hook_vae_none():
    from lpl_plugin import LPLConfig, LPLHook
    return LPLHook(None, LPLConfig(use_lpl=True))


@case
def latents_channels():
    return _loss()(_latents(1, 3, 8, 8), _latents(1, 3, 8, 8))


@case
def latents_int():
    import torch
    return _loss()(_latents(1, 4, 8, 8, dtype=torch.int64), _latents(1, 4, 8, 8, dtype=torch.int64))


@case
def latents_bool():
    import torch
    return _loss()(_latents(1, 4, 8, 8, dtype=torch.bool), _latents(1, 4, 8, 8))


@case
def latents_complex():
    import torch
    return _loss()(_latents(1, 4, 8, 8, dtype=torch.complex64), _latents(1, 4, 8, 8))


@case
def latents_3d():
    return _loss()(_latents(4, 8, 8), _latents(4, 8, 8))


@case
def latents_shapes_differ():
    return _loss()(_latents(1, 4, 8, 8), _latents(2, 4, 8, 8))


@case
def latents_devices_differ():
    import torch
    return _loss()(_latents(1, 4, 8, 8), torch.zeros(1, 4, 8, 8, device="meta"))


@case
def latents_empty():
    return _loss()(_latents(0, 4, 8, 8), _latents(0, 4, 8, 8))


@case
def latents_list():
    return _loss()([[0.0]], _latents(1, 4, 8, 8))


@case
def loss_device_bad():
    from lpl_plugin import LatentPerceptualLoss
    return LatentPerceptualLoss(_vae(), device="gpu9")


# -- file-based runners -------------------------------------------------------------------------------------------

def run_file(runner: str, path: str) -> Any:
    """One catalogue file through the API that reads it."""
    if runner == "api-config":
        from lpl_plugin import check_training_config
        return check_training_config(path).raise_for_problems()
    if runner == "api-vae":
        from lpl_plugin import load_vae
        return load_vae(path)
    if runner == "api-image":
        from lpl_plugin.settings.files import open_image
        return open_image(path)
    raise ValueError(f"unknown runner {runner}")


def main() -> int:
    """Run every case given, printing one JSON line per case."""
    cases = json.loads(open(sys.argv[1], encoding="utf-8").read())
    for item in cases:
        outcome: dict[str, Any] = {"name": item["name"], "runner": item["runner"]}
        try:
            if item["runner"] == "api":
                CASES[item["api"]]()
            else:
                run_file(item["runner"], item["file"])
            outcome["raised"] = False
        except Exception as error:  # the point: which exception, and its message
            outcome.update(raised=True, type=type(error).__name__, mro=[c.__name__ for c in type(error).__mro__],
                           message=str(error), traceback=traceback.format_exc(limit=-3))
        print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
