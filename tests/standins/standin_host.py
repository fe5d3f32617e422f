"""Shared bodies of the sd-scripts stand-ins (tests only; written for these tests, not sd-scripts code).

Each `sd_scripts_*` folder mimics one sd-scripts release as far as lpl-plugin sees it (module layout, signatures);
its functions delegate here. The loop trains a one-convolution "UNet" on cached latents of a tiny SDXL-layout VAE
in a few seconds on the CPU, with the host's order of calls: noise helper, UNet, conditional_loss, masking,
per-sample mean, loss_weights, noise-level weights, mean, backward, optimizer step.

The scripts' shared parts look the host's helpers up on their module at call time (`library(...)` or a module passed
in), never through a name bound at import: the adapter wraps them there.
"""

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpl_plugin.settings.toml_io import tomllib


# -- library functions ------------------------------------------------------------------------------------------

def noise_and_timesteps(args: Any, scheduler: Any, latents: torch.Tensor):
    """Noise, noisy latents and timesteps in [min_timestep, max_timestep).

    Test knobs for runs of several processes: LPL_STANDIN_TIMESTEPS="900,10" gives every sample of rank i the
    i-th timestep; LPL_STANDIN_NAN_RANK=i makes rank i's noisy latents NaN (so its model output and LPL are).
    """
    noise = torch.randn_like(latents)
    low = args.min_timestep or 0
    high = args.max_timestep or scheduler.config.num_train_timesteps
    batch = latents.shape[0]
    timesteps = torch.randint(low, high, (batch,)) if low < high else torch.full((batch,), high)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if os.environ.get("LPL_STANDIN_TIMESTEPS"):
        timesteps = torch.full((batch,), int(os.environ["LPL_STANDIN_TIMESTEPS"].split(",")[rank]))
    timesteps = timesteps.long().to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if os.environ.get("LPL_STANDIN_NAN_RANK") == str(rank):
        noisy = noisy * float("nan")
    return noise, noisy, timesteps


def huber_threshold(args: Any, timesteps: torch.Tensor):
    """A constant per-sample Huber threshold for huber / smooth_l1, else None."""
    if args.loss_type not in ("huber", "smooth_l1"):
        return None
    return torch.full((timesteps.shape[0],), float(args.huber_c), device=timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, reduction: str, huber_c):
    """l2, l1, huber or smooth_l1 with the given reduction."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    c = huber_c.view(-1, *([1] * (pred.dim() - 1)))
    loss = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c) * (c if loss_type == "huber" else 1)
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


def prepare_scheduler(scheduler: Any, device: Any) -> None:
    """Attach the per-timestep SNR table the weight functions read."""
    ac = scheduler.alphas_cumprod
    scheduler.all_snr = (ac / (1 - ac)).to(device)


def _snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.all_snr[timesteps]


def min_snr(loss, timesteps, scheduler, gamma, v_prediction=False):
    """Min-SNR-gamma weight."""
    snr = _snr(scheduler, timesteps)
    return loss * (torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)).to(loss.device)


def v_scale(timesteps, scheduler):
    """snr / (snr + 1) with the SNR capped at 1000."""
    snr = torch.clamp(_snr(scheduler, timesteps), max=1000)
    return snr / (snr + 1)


def debiased(loss, timesteps, scheduler, v_prediction=False):
    """1 / sqrt(snr) (1 / (snr + 1) for v-prediction) with the SNR capped at 1000."""
    snr = torch.clamp(_snr(scheduler, timesteps), max=1000)
    return loss * (1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr))


def masked(loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """Multiply an element-wise loss by the batch's alpha masks resized to it."""
    masks = batch.get("alpha_masks")
    if masks is None:
        return loss
    return loss * F.interpolate(masks.to(loss.dtype).unsqueeze(1), size=loss.shape[2:], mode="area")


def read_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Flatten the TOML one table deep into a namespace and re-parse the command line over it."""
    if not args.config_file:
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    flat: dict[str, Any] = {}
    for key, value in tomllib.loads(Path(path).read_text(encoding="utf-8")).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return parser.parse_args(namespace=argparse.Namespace(**flat))


class JsonTracker:
    """An accelerate tracker appending logged scalars to `<logging_dir>/logs.jsonl`."""

    name = "json"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, folder: str):
        self.path = Path(folder) / "logs.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self) -> None:
        pass


def prepare_accelerator(args: argparse.Namespace):
    """An Accelerator with gradient accumulation and, when a logging_dir is set, the JSON tracker."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    tracker_class = type("StandinJsonTracker", (JsonTracker, GeneralTracker), {})
    trackers = [tracker_class(args.logging_dir)] if args.logging_dir else None
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=trackers, cpu=True)


def prepare_dtype(args: argparse.Namespace):
    """The UNet's weight dtype and the save dtype."""
    return (torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32), None


class Denoiser(nn.Module):
    """The stand-in UNet: one 3x3 convolution, called as `unet(noisy_latents, timesteps)`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def load_models(args: argparse.Namespace, accelerator: Any, weight_dtype: torch.dtype):
    """The seven values sd-scripts' sdxl_train_util.load_target_model returns, with tiny models."""
    from lpl_plugin.engine.tiny import tiny_vae

    torch.manual_seed(args.seed)
    vae = tiny_vae().float()
    vae.config.scaling_factor = 0.18215  # what sd-scripts' single-file VAE config says; LPL must not trust it
    return False, None, None, vae, Denoiser(), None, None


def model_spec(args: argparse.Namespace) -> dict[str, str]:
    """A modelspec-like metadata dict."""
    return {"modelspec.architecture": "stand-in/sdxl"}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The host options the stand-ins read."""
    add = parser.add_argument
    add("--config_file")
    add("--dataset_config")
    add("--output_dir")
    add("--logging_dir")
    add("--seed", type=int, default=0)
    add("--max_train_steps", type=int, default=4)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-2)
    add("--mixed_precision", default="no")
    add("--loss_type", default="l2")
    add("--huber_c", type=float, default=0.1)
    add("--min_timestep", type=int)
    add("--max_timestep", type=int)
    add("--min_snr_gamma", type=float)
    add("--scale_v_pred_loss_like_noise_pred", action="store_true")
    add("--v_pred_like_loss", type=float)
    add("--debiased_estimation_loss", action="store_true")
    add("--v_parameterization", action="store_true")
    add("--masked_loss", action="store_true")
    add("--max_data_loader_n_workers", type=int, default=0)
    add("--save_state", action="store_true")
    add("--resume")
    add("--no_metadata", action="store_true")
    add("--max_train_epochs", type=int)
    add("--train_data_dir")  # DreamBooth-style folders "<repeats>_<name>" of images: trained on when given
    add("--output_name")
    add("--log_with")
    add("--sample_prompts")
    add("--sample_every_n_steps", type=int)
    add("--sample_at_first", action="store_true")
    add("--sample_sampler", default="ddim")
    add("--save_every_n_steps", type=int)


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    """The SDXL options."""
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")


# -- the scripts' shared parts -----------------------------------------------------------------------------------

def library(name: str) -> Any:
    """The stand-in's `library.<name>` module (looked up at call time)."""
    return importlib.import_module(f"library.{name}")


def unet_output(unet: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, accelerator: Any,
                weight_dtype: torch.dtype, is_train: bool) -> torch.Tensor:
    """The UNet's prediction under the accelerator's autocast, with gradients in training steps only."""
    with torch.set_grad_enabled(is_train), accelerator.autocast():
        return unet(noisy_latents.to(weight_dtype), timesteps)


def training_target(args: Any, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the velocity with v-parameterization, else the noise."""
    return noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise


def per_sample(loss: torch.Tensor, batch: dict, args: Any) -> torch.Tensor:
    """An element-wise loss masked (when asked, or when the batch has alpha masks) and averaged per sample."""
    if args.masked_loss or ("alpha_masks" in batch and batch["alpha_masks"] is not None):
        loss = library("custom_train_functions").apply_masked_loss(loss, batch)
    return loss.mean(dim=list(range(1, loss.ndim)))


def noise_level_weights(loss: torch.Tensor, args: Any, timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    """The host's noise-level weights in its order: min-SNR, scale_v_pred, v_pred_like, debiased."""
    functions = library("custom_train_functions")
    if args.min_snr_gamma:
        loss = functions.apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
    if args.scale_v_pred_loss_like_noise_pred:
        loss = functions.scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if args.v_pred_like_loss:
        loss = functions.add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if args.debiased_estimation_loss:
        loss = functions.apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
    return loss


def wants_per_sample_loss(args: Any) -> bool:
    """Whether sdxl_train.py takes the per-sample loss (noise-level weights, masking) or conditional_loss's mean."""
    return bool(args.min_snr_gamma or args.scale_v_pred_loss_like_noise_pred or args.v_pred_like_loss
                or args.debiased_estimation_loss or args.masked_loss)


def step_logs(current_loss: float, avr_loss: float, lr_scheduler: Any) -> dict[str, float]:
    """NetworkTrainer.generate_step_logs: the loss and the learning rate."""
    return {"loss/current": current_loss, "loss/average": avr_loss, "lr/unet": lr_scheduler.get_last_lr()[0]}


LossFn = Callable[[dict, nn.Module, nn.Module, Any, Any, torch.dtype, bool], torch.Tensor]


def train_lora(trainer: Any, args: argparse.Namespace, loss_fn: LossFn) -> None:
    """NetworkTrainer.train: the loop with the trainer's models and step logs and the given per-step loss."""
    def load(args, accelerator, weight_dtype):
        _, _, vae, unet = trainer.load_target_model(args, weight_dtype, accelerator)
        return vae, unet

    train(args, load=load, loss_fn=loss_fn, step_logs=trainer.generate_step_logs, lora=True)


class NetworkTrainerBase:
    """What every release's train_network.NetworkTrainer stand-in shares: SD1's latent scale (SDXL sets its own)."""

    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False


class ProcessBatchTrainer(NetworkTrainerBase):
    """The NetworkTrainer of v0.10.1 and v0.11: the per-step loss in process_batch and post_process_loss.

    `loss_helpers` is the module the release takes get_noise_noisy_latents_and_timesteps,
    get_huber_threshold_if_needed and conditional_loss from.
    """

    loss_helpers: Any

    def post_process_loss(self, loss, args, timesteps: torch.IntTensor, noise_scheduler) -> torch.FloatTensor:
        return noise_level_weights(loss, args, timesteps, noise_scheduler)

    def get_sai_model_spec(self, args):
        return library("train_util").get_sai_model_spec(None, args, self.is_sdxl, True, False)

    def update_metadata(self, metadata, args):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True) -> torch.Tensor:
        helpers = self.loss_helpers
        with torch.no_grad():
            latents = batch["latents"].to(accelerator.device) * self.vae_scale_factor
        noise, noisy_latents, timesteps = helpers.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)
        noise_pred = unet_output(unet, noisy_latents, timesteps, accelerator, weight_dtype, is_train)
        target = training_target(args, noise_scheduler, latents, noise, timesteps)
        huber_c = helpers.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        loss = helpers.conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
        loss = per_sample(loss, batch, args) * batch["loss_weights"]
        return self.post_process_loss(loss, args, timesteps, noise_scheduler).mean()

    def train(self, args):
        def loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, is_train):
            return self.process_batch(batch, [], unet, None, vae, scheduler, None, weight_dtype, accelerator, args,
                                      None, None, is_train=is_train)

        train_lora(self, args, loss_fn)


class SdxlTrainerMixin:
    """sdxl_train_network.SdxlNetworkTrainer's own parts, mixed into the release's NetworkTrainer: SDXL's latent
    scale and models."""

    def __init__(self):
        super().__init__()
        self.vae_scale_factor = library("sdxl_model_util").VAE_SCALE_FACTOR
        self.is_sdxl = True

    def load_target_model(self, args, weight_dtype, accelerator):
        version = library("sdxl_model_util").MODEL_VERSION_SDXL_BASE_V1_0
        _, text_encoder1, text_encoder2, vae, unet, _, _ = library("sdxl_train_util").load_target_model(
            args, accelerator, version, weight_dtype)
        return version, [text_encoder1, text_encoder2], vae, unet


def network_parser(arguments_module: Any) -> argparse.ArgumentParser:
    """train_network.setup_parser: the common training options (`arguments_module`'s add_training_arguments) and
    the LoRA trainer's start-step options."""
    parser = argparse.ArgumentParser()
    arguments_module.add_training_arguments(parser, True)
    parser.add_argument("--initial_epoch", type=int)
    parser.add_argument("--initial_step", type=int)
    return parser


def with_sdxl_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser with library.sdxl_train_util's SDXL options added."""
    library("sdxl_train_util").add_sdxl_training_arguments(parser)
    return parser


def run_sdxl_network_script(parser: argparse.ArgumentParser, config_module: Any, trainer_class: type) -> None:
    """sdxl_train_network.py's main: parse the command line, merge the config file (`config_module`'s
    read_config_from_file), then make the trainer and train."""
    args = parser.parse_args()
    args = config_module.read_config_from_file(args, parser)
    trainer = trainer_class()
    trainer.train(args)


# -- the tiny training loop ---------------------------------------------------------------------------------------

class CachedLatents(torch.utils.data.Dataset):
    """Eight cached (unscaled) latents; each item also says which process loaded it."""

    def __init__(self) -> None:
        self.latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 4

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "loss_weights": torch.tensor(1.0), "pid": os.getpid()}


def make_scheduler(device: Any):
    """sd-scripts' SDXL training scheduler, prepared for its custom loss weights."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    importlib.import_module("library.custom_train_functions").prepare_scheduler_for_custom_training(scheduler, device)
    return scheduler


def train(args: argparse.Namespace, *, load: Callable[..., tuple], loss_fn: LossFn,
          step_logs: Callable[..., dict] | None, lora: bool) -> None:
    """Train, validate once, save weights with metadata (and the state), and write summary.json."""
    train_util = importlib.import_module("library.train_util")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.txt").open("a") as f:
        f.write(f"{os.getpid()}\n")
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    vae, unet = load(args, accelerator, weight_dtype)
    scheduler = make_scheduler(accelerator.device)
    workers = args.max_data_loader_n_workers
    dataset = ImageLatents(args.train_data_dir, vae) if getattr(args, "train_data_dir", None) else CachedLatents()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers else None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    done = 0  # like sd-scripts, a resumed run restarts its step count and stops at max_train_steps in total
    if args.resume:
        accelerator.load_state(args.resume)
        done = json.loads((Path(args.resume) / "train_state.json").read_text())["current_step"]
    if accelerator.log_with:
        accelerator.init_trackers("standin")
    losses: list[float] = []
    pids: set[int] = set()
    global_step = 0
    sample_at(args, accelerator, 0, done, vae, unet)  # sd-scripts passes epoch 0 here
    while global_step + done < args.max_train_steps:
        for batch in loader:
            pids.update(int(p) for p in batch.pop("pid"))
            with accelerator.accumulate(unet):
                loss = loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, True)
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
                sample_at(args, accelerator, None, global_step + done, vae, unet)
                save_every(args, accelerator, global_step + done, lora)
                interrupt_at(global_step + done)
            current = loss.detach().item()
            losses.append(current)
            if len(accelerator.trackers) > 0:
                logs = step_logs(args, current, sum(losses) / len(losses), lr_scheduler, None) if step_logs \
                    else {"loss": current}
                accelerator.log(logs, step=global_step)
            if global_step + done >= args.max_train_steps:
                break
    batch = next(iter(loader))
    batch.pop("pid")
    validation = loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, False).item()
    metadata = {"ss_output_name": "standin"}
    metadata.update(train_util.get_sai_model_spec(None, args, True, lora, False))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(unet).state_dict().items()},
              str(out / "model.safetensors"), metadata)
    if args.save_state:
        state = out / "state"
        accelerator.save_state(str(state))
        if lora:
            record = {"current_epoch": 1, "current_step": global_step + done}
            (state / "train_state.json").write_text(json.dumps(record))
    summary = {"losses": losses, "validation": validation, "main_pid": os.getpid(), "loader_pids": sorted(pids),
               "steps": global_step}
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    accelerator.end_training()


# -- sampling and saving like the real scripts (lpl-plugin compare) ------------------------------------------------

class ImageLatents(torch.utils.data.Dataset):
    """The images of a DreamBooth-style folder tree, encoded once by the VAE (unscaled latents), captions ignored."""

    def __init__(self, root: str, vae: nn.Module) -> None:
        from PIL import Image

        paths = sorted(p for folder in sorted(Path(root).iterdir()) if folder.is_dir()
                       for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        pixels = []
        for path in paths:
            with Image.open(path) as image:
                data = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)
                pixels.append(data.view(image.height, image.width, 3).permute(2, 0, 1) / 127.5 - 1)
        with torch.no_grad():
            self.latents = vae.encode(torch.stack(pixels)).latent_dist.mean

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "loss_weights": torch.tensor(1.0), "pid": os.getpid()}


def sample_at(args: Any, accelerator: Any, epoch: Any, steps: int, vae: nn.Module, unet: nn.Module) -> None:
    """The loop's sampling call, through library.sdxl_train_util.sample_images like sdxl_train*.py."""
    library("sdxl_train_util").sample_images(accelerator, args, epoch, steps, accelerator.device, vae, [None, None],
                                             [None, None], unet)


def parse_prompt(line: str) -> dict[str, Any]:
    """One prompt-file line: the prompt, then --w, --h, --d (seed) and --s (steps) options."""
    text, *options = line.split(" --")
    found: dict[str, Any] = {"prompt": text.strip(), "w": 64, "h": 64, "d": 0, "s": 4}
    for option in options:
        key, _, value = option.partition(" ")
        if key in found:
            found[key] = int(value.strip())
    return found


def sample_images_common(pipe_class, accelerator, args, epoch, steps, device, vae, tokenizer, text_encoder,
                         unet_wrapped, prompt_replacement=None, controlnet=None) -> None:
    """Sample every prompt when the schedule says so (at first, every n steps), deterministic DDIM from seeded
    noise, saved as <output_name>_<steps:06d>_<index:02d>_<timestamp>_<seed>.png under output_dir/sample
    (e<epoch:06d> in place of the steps when called with an epoch, as before the first step)."""
    import time

    from PIL import Image

    if steps == 0 and not args.sample_at_first:
        return
    if steps != 0 and (not args.sample_every_n_steps or steps % args.sample_every_n_steps or epoch is not None):
        return
    if not args.sample_prompts or not accelerator.is_main_process:
        return
    folder = Path(args.output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    unet = accelerator.unwrap_model(unet_wrapped)
    ac = make_scheduler("cpu").alphas_cumprod
    lines = [line for line in Path(args.sample_prompts).read_text().splitlines() if line.strip()]
    for index, line in enumerate(lines):
        prompt = parse_prompt(line)
        x = torch.randn(1, 4, prompt["h"] // 8, prompt["w"] // 8, generator=torch.Generator().manual_seed(prompt["d"]))
        times = torch.linspace(999, 0, prompt["s"] + 1).round().long()
        with torch.no_grad():
            for t, after in zip(times[:-1], times[1:]):
                eps = unet(x, t.view(1)).float()
                z0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
                x = ac[after].sqrt() * z0 + (1 - ac[after]).sqrt() * eps if after > 0 else z0
            pixels = vae.decode(x / library("sdxl_model_util").VAE_SCALE_FACTOR).sample
        data = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        stamp = time.strftime("%Y%m%d%H%M%S")
        prefix = f"{args.output_name}_" if args.output_name else ""
        number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
        Image.fromarray(data).save(folder / f"{prefix}{number}_{index:02d}_{stamp}_{prompt['d']}.png")


def save_every(args: Any, accelerator: Any, steps: int, lora: bool) -> None:
    """With --save_state and --save_every_n_steps: the state as <output_name>-step<steps:08d>-state, like sd-scripts."""
    if not (args.save_state and args.save_every_n_steps) or steps % args.save_every_n_steps:
        return
    state = Path(args.output_dir) / f"{args.output_name or 'last'}-step{steps:08d}-state"
    accelerator.save_state(str(state))
    if lora:
        (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": steps}))


def interrupt_at(steps: int) -> None:
    """Test knobs: LPL_STANDIN_INTERRUPT_AT=k stops the run after optimizer step k as Ctrl-C would;
    LPL_STANDIN_STEP_SECONDS=s makes each optimizer step last s seconds more, as a real one would."""
    if os.environ.get("LPL_STANDIN_INTERRUPT_AT") == str(steps):
        raise KeyboardInterrupt
    time.sleep(float(os.environ.get("LPL_STANDIN_STEP_SECONDS", "0")))
