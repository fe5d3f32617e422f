"""`lpl-plugin compare`: check the inputs, train each arm (reusing finished ones), then write the report."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from lpl_plugin.settings.errors import UserError, write_lines
from lpl_plugin.settings.messages import show_path
from lpl_plugin.settings.preflight import _host_values, check_training_config, check_training_mapping
from lpl_plugin.settings.toml_io import read_toml
from lpl_plugin.compare.collect import collect
from lpl_plugin.compare.dataset import hold_out, held_out_dataset, pick, training_images
from lpl_plugin.compare.plan import (DONE_FILE, PLAN_FILE, Arm, Plan, arm_done, arm_host, check_dir, make_arms,
                                     prompt_lines, prompts_from, sample_interval, write_arm_toml)
from lpl_plugin.compare.report import Prompt, write_report
from lpl_plugin.compare.runner import ArmFailed, command, last_state, python_executable, run_arm, state_step

SCRIPTS = {True: "sdxl_train_network.py", False: "sdxl_train.py"}


def say(line: str) -> None:
    """A progress line on stdout, at once."""
    print(line, flush=True)


def size_of(args: argparse.Namespace, host: dict[str, Any], data: dict[str, Any] | None) -> tuple[int, int]:
    """(width, height) to sample and measure at: --size, the TOML's or dataset config's resolution, else 1024."""
    if args.size:
        return args.size, args.size
    value = host.get("resolution")
    for dataset in (data or {}).get("datasets", []):
        value = dataset.get("resolution", (data or {}).get("general", {}).get("resolution", value))
        break
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, str) and value.replace(",", "").strip().isdigit():
        parts = [int(p) for p in value.split(",")]
        return parts[0], parts[-1]
    return 1024, 1024


def checked_host(path: Path) -> dict[str, Any]:
    """The user's TOML as sd-scripts flattens it, after the checks `lpl-plugin validate` makes (UserError)."""
    checked = check_training_config(path)
    write_lines(checked.warnings)
    checked.raise_for_problems()
    data, problems = read_toml(path)
    assert data is not None and not problems
    return _host_values(data)


def build_plan(args: argparse.Namespace) -> tuple[Plan, list[dict[str, Any]], dict[str, Any]]:
    """The plan, the measure images (path, caption) and the dataset keys a holdout adds; UserError on bad input."""
    checkout = args.sd_scripts
    host = checked_host(args.config)
    source = show_path(args.config)
    script = checkout / SCRIPTS[bool(host.get("network_module"))]
    if not script.is_file():
        raise UserError(f"--sd-scripts {show_path(checkout)}: no {script.name} there (the TOML "
                        f"{'sets' if host.get('network_module') else 'does not set'} network_module)")
    parts, data, images = training_images(host, source)
    steps = args.steps or host.get("max_train_steps")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"{source}: max_train_steps is not set (got {steps!r}); pass --steps N")
    extra: dict[str, Any] = {}
    if args.holdout is not None:
        if args.holdout >= len(images):
            raise UserError(f"--holdout {args.holdout}: the dataset has {len(images)} images; keep at least one for "
                            "training")
        measured = pick(images, args.holdout)
        extra = {"holdout": [str(i.path) for i in measured]}
    else:
        measured = pick(images, args.measure_images)
    size = size_of(args, host, data)
    prompts = prompts_from(args.prompts, images, args.prompt_count)
    measure = {"images": [{"path": str(i.path), "caption": i.caption} for i in measured], "size": list(size),
               "timesteps": args.noise_levels, "noise_seeds": list(range(args.noise_seeds)),
               "sample_steps": args.sample_steps}
    arms = make_arms(None if args.weights else args.arms, args.weights, args.seeds, int(host.get("seed") or 0))
    plan = Plan(script=str(script.resolve()), host=host, arms=arms, steps=steps,
                sample_every=sample_interval(steps, args.checkpoints), prompts=prompts, measure=measure, extra=extra)
    return plan, measure["images"], {"parts": parts, "data": data, "held": measured if extra else None}


def arm_folder(out: Path, plan: Plan, arm: Arm) -> Path:
    """DIR/<arm> (DIR/<arm>-seed<k> with several seeds)."""
    return out / (arm.label if len({a.seed for a in plan.arms}) > 1 else arm.name)


def prepare(out: Path, plan: Plan, dataset: dict[str, Any]) -> Path:
    """Write compare.json, the prompt file and (with --holdout) the reduced dataset; returns the prompt file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps({"fingerprint": plan.fingerprint(), "script": plan.script,
                                             "steps": plan.steps, "arms": [a.__dict__ for a in plan.arms]}, indent=2))
    prompts_file = out / "prompts.txt"
    prompts_file.write_text(prompt_lines(plan.prompts, tuple(plan.measure["size"]), plan.measure["sample_steps"]))
    if dataset["held"] is not None:
        moved = hold_out(dataset["parts"], dataset["held"], out / "data")
        plan.dataset_keys = held_out_dataset(plan.host, dataset["data"], moved, out / "data")
    return prompts_file


def train_arm(out: Path, plan: Plan, arm: Arm, prompts_file: Path) -> str:
    """Train one arm unless it finished under these settings; returns how its run came about."""
    folder = arm_folder(out, plan, arm)
    fingerprint = plan.fingerprint()
    if arm_done(folder, fingerprint):
        status = json.loads((folder / DONE_FILE).read_text())["status"]
        say(f"{folder.name}: finished earlier with these settings; reused")
        return f"{status}; reused by a later run of the same compare"
    state = last_state(folder / "out")
    if state is not None:
        status, doing = f"resumed from its saved state {state.name}", f"resuming from its saved state {state.name}"
    elif (folder / "measure").exists() or (folder / "out").exists():
        status = "restarted from scratch (interrupted before any saved state)"
        doing = "restarting from scratch (interrupted before any saved state)"
        shutil.rmtree(folder / "measure", ignore_errors=True)
        shutil.rmtree(folder / "out", ignore_errors=True)
        shutil.rmtree(folder / "logs", ignore_errors=True)
    else:
        status, doing = "trained", "training"
    # on resume, sd-scripts continues its step count from the state only with skip_until_initial_step
    config = write_arm_toml(plan, arm, folder, prompts_file, {"skip_until_initial_step": True} if state else {})
    plan_file = folder / "measure_plan.json"
    plan_file.write_text(json.dumps({**plan.measure, "out": str(folder / "measure"),
                                     "resumed_at": state_step(state) if state else None}, indent=2))
    say(f"{folder.name}: {doing} ({plan.steps} steps, use_lpl = {str(arm.lpl['use_lpl']).lower()}"
        f"{', lpl_weight = ' + format(arm.lpl['lpl_weight'], 'g') if 'lpl_weight' in arm.lpl else ''}, seed {arm.seed}); "
        f"log: {folder / 'train.log'}")
    run_arm(command(python_executable(), Path(plan.script), config, state), folder, plan_file, plan.steps,
            folder.name, say)
    (folder / DONE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "status": status}))
    return status


def compare(args: argparse.Namespace) -> int:
    """The whole command; returns the exit status."""
    out = args.out
    plan, measured, dataset = build_plan(args)
    check_dir(out, plan.fingerprint())
    prompts_file = prepare(out, plan, dataset)
    for arm in plan.arms:  # every arm's exact settings pass the validate checks before anything trains
        folder = arm_folder(out, plan, arm)
        checked = check_training_mapping(arm_host(plan, arm, folder, prompts_file), f"arm {folder.name}")
        checked.raise_for_problems()
    statuses = {}
    try:
        for arm in plan.arms:
            statuses[arm.label] = train_arm(out, plan, arm, prompts_file)
    except KeyboardInterrupt:
        print(f"stopped; run the same command again to continue (finished arms are reused): {show_path(out)}",
              file=sys.stderr)
        return 130
    except ArmFailed as failed:
        write_lines([str(failed)])
        return 2 if failed.returncode == 2 else 1
    results = [collect(arm_folder(out, plan, arm), arm.name, arm.seed,
                       arm_host(plan, arm, arm_folder(out, plan, arm), prompts_file), statuses[arm.label],
                       [p["id"] for p in plan.prompts]) for arm in plan.arms]
    where = "held-out images (kept out of training)" if dataset["held"] is not None else \
        "training images (the model saw them)"
    report = write_report(out, results, prompts=[Prompt(p["id"], p["text"], p["seed"]) for p in plan.prompts],
                          reference=plan.arms[0].name, measured_on=f"{len(measured)} {where}",
                          title=f"lpl-plugin compare: {show_path(args.config)}, {plan.steps} steps per arm")
    say(f"verdict: {report['verdict']}")
    say(f"report: {out / 'report.html'} (also report.md, report.json)")
    return 0
