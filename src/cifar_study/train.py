"""Train one run of the study and write its files.

    python -m cifar_study.train --run-id mlp --config config.yaml \\
        --data results/data/cifar10.pt --out results/runs/mlp --threads 2

``--settings '{"model": "mlp", ...}'`` takes every resolved setting instead of
a config file; the train rule passes them that way.

The run folder receives ``history.csv``, ``grad_norms.csv``, ``model.pt`` and,
last, ``run.json``, each written under a temporary name and renamed when
complete. ``resume.pt``, written at the end of every epoch, lets a killed job
continue from its last finished epoch; it is removed when the run ends.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchvision

from cifar_study.config import (
    MODEL_ARGS,
    TRAIN_SETTINGS,
    ConfigError,
    _check_settings,
    build_study,
    canonical_value,
    load_config,
)
from cifar_study.data import DataError, load_prepared
from cifar_study.devices import choose_fast_path, place_model, select_device
from cifar_study.engine import evaluate, train_epoch
from cifar_study.io import torch_load, torch_save, write_csv, write_json
from cifar_study.models import build_model, count_parameters

log = logging.getLogger("cifar_study.train")

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_seconds", "eval_seconds"]
RESUME_FILE = "resume.pt"


class CheckpointError(RuntimeError):
    """A resume checkpoint that cannot be used; the message names the file and the fix."""


def make_optimizer(model: torch.nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, weight_decay = settings["optimizer"], settings["lr"], settings["weight_decay"]
    params = list(model.parameters())
    # The fused kernels (CPU and CUDA, torch >= 2.4) update all parameters in one
    # pass; on the CPU the default per-parameter loop of AdamW took 3-10x longer.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if name == "adam":
        # Adam adds weight_decay * w to the gradient (L2), unlike AdamW's decoupled decay.
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings["momentum"], weight_decay=weight_decay, fused=fused)
    raise ValueError(f"optimizer={name!r} is unknown; use adam, adamw or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, settings: dict[str, Any]):
    """Return a per-epoch learning-rate schedule: constant, or cosine decay to zero over ``epochs``."""
    epochs = settings["epochs"]
    if settings["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_resume_checkpoint(path: Path, settings: dict[str, Any], data_digest: str | None) -> dict[str, Any] | None:
    """Return the resume checkpoint at ``path`` if it was made for these settings and data."""
    if not path.exists():
        return None
    checkpoint = torch_load(
        path, CheckpointError, f"cannot read resume checkpoint {path}; delete it to train this run from scratch"
    )
    if checkpoint.get("settings") != json.loads(json.dumps(settings)) or checkpoint.get("data_digest") != data_digest:
        log.warning("ignoring resume checkpoint %s: it was made with other settings or data", path)
        return None
    return checkpoint


def _data_digest(data_path: Path) -> str | None:
    summary = data_path.with_suffix(".json")
    if summary.is_file():
        return json.loads(summary.read_text()).get("sha256_images")
    return None


def lock_run_folder(out_dir: Path, run_id: str):
    """Take an exclusive lock on the run folder, held until the process ends.

    A training process left running after its Snakemake was killed would
    otherwise write the same files as the rerun that replaces it.
    """
    handle = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(
            f"run {run_id} is already being trained in {out_dir} by process {owner}; "
            f"wait for it to finish or stop it (kill {owner}) before training the run again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files that a killed process left behind in its run folder."""
    for path in out_dir.glob(".*.tmp"):
        log.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)


def validate_settings(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Check a run's settings before any compute; raise ConfigError naming the bad key."""
    if model not in MODEL_ARGS:
        raise ConfigError(f"model={model!r} is unknown; use one of {', '.join(MODEL_ARGS)}")
    settings = {k: canonical_value(v) for k, v in settings.items()}
    _check_settings("settings", model, settings)
    missing = sorted((set(TRAIN_SETTINGS) | set(MODEL_ARGS[model])) - set(settings))
    if missing:
        raise ConfigError(f"settings: missing {', '.join(missing)}; pass every resolved setting of the run")
    return settings


def train_run(
    run_id: str,
    model_name: str,
    settings: dict[str, Any],
    data_path: str | Path,
    out_dir: str | Path,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train one run, write its files to ``out_dir`` and return the contents of run.json."""
    settings = validate_settings(model_name, settings)
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is invalid; use a positive number of CPU threads")
    data_path, out_dir = Path(data_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_lock = lock_run_folder(out_dir, run_id)
    try:
        remove_stale_temporaries(out_dir)
        return _train_locked(run_id, model_name, settings, data_path, out_dir, device, threads)
    finally:
        run_lock.close()


def _train_locked(
    run_id: str,
    model_name: str,
    settings: dict[str, Any],
    data_path: Path,
    out_dir: Path,
    device: str | None,
    threads: int | None,
) -> dict[str, Any]:
    """Train a run whose settings are valid and whose folder this process has locked."""
    if threads:
        torch.set_num_threads(threads)

    # Everything that can fail on bad input fails here, before training starts.
    torch_device, gpu_slot = select_device(device, lock_dir=out_dir.parent / ".gpu-locks")
    fast_path = choose_fast_path(model_name, torch_device, settings["precision"], settings["compile"])
    precision = fast_path.precision
    model_args = {k: v for k, v in settings.items() if k in MODEL_ARGS[model_name]}
    torch.manual_seed(settings["seed"])
    model = build_model(model_name, **model_args)
    data = load_prepared(data_path, torch_device)
    data_digest = _data_digest(data_path)
    resume_path = out_dir / RESUME_FILE
    checkpoint = load_resume_checkpoint(resume_path, settings, data_digest)

    channels_last = fast_path.channels_last
    model, step_model = place_model(model, torch_device, fast_path)
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    generator = torch.Generator(device=torch_device).manual_seed(settings["seed"])
    param_names = [name for name, p in model.named_parameters() if p.requires_grad]

    history: list[dict[str, Any]] = []
    grad_rows: list[dict[str, Any]] = []
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    epochs_since_best = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"], generator, torch_device)
        history, grad_rows = checkpoint["history"], checkpoint["grad_norms"]
        best = checkpoint["best"]
        epochs_since_best = checkpoint["epochs_since_best"]
        log.info("%s resuming after epoch %d from %s", run_id, len(history), resume_path)

    log.info(
        "%s training %s (%s parameters) on %s in %s for up to %d epochs; %d train, %d validation images",
        run_id, model_name, f"{count_parameters(model):,}", torch_device, precision, settings["epochs"],
        len(data["train_labels"]), len(data["val_labels"]),
    )

    status = "completed"
    patience = settings["early_stopping_patience"]
    for epoch in range(len(history) + 1, settings["epochs"] + 1):
        if history and not math.isfinite(history[-1]["train_loss"]):
            status = "diverged"
            break
        if patience is not None and epochs_since_best >= patience:
            status = "early_stopped"
            break

        lr = optimizer.param_groups[0]["lr"]
        train = train_epoch(
            step_model, optimizer, data["train_images"], data["train_labels"], settings["batch_size"],
            generator, precision, augment=settings["augment"], channels_last=channels_last,
            progress_label=f"{run_id} epoch {epoch}",
        )
        val = evaluate(step_model, data["val_images"], data["val_labels"], settings["eval_batch_size"], precision, channels_last)
        scheduler.step()

        history.append({
            "epoch": epoch, "train_loss": train.loss, "train_acc": train.acc, "val_loss": val.loss,
            "val_acc": val.acc, "lr": lr, "train_seconds": train.seconds, "eval_seconds": val.seconds,
        })
        for name, mean_norm, max_norm in zip(param_names, train.grad_norm_mean, train.grad_norm_max):
            grad_rows.append({"epoch": epoch, "layer": name, "mean_norm": mean_norm, "max_norm": max_norm})

        finite = math.isfinite(train.loss)
        if finite and val.acc > best["val_acc"]:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = {"val_acc": val.acc, "epoch": epoch, "state": best_state}
            epochs_since_best = 0
        else:
            epochs_since_best += 1
        log.info(
            "%s epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f lr %.3g time %.1fs+%.1fs%s",
            run_id, epoch, settings["epochs"], train.loss, train.acc, val.loss, val.acc, lr,
            train.seconds, val.seconds, "" if finite else " non-finite loss: diverged",
        )

        torch_save(resume_path, {
            "settings": json.loads(json.dumps(settings)), "data_digest": data_digest,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": _rng_state(generator, torch_device), "history": history, "grad_norms": grad_rows,
            "best": best, "epochs_since_best": epochs_since_best,
        })
    else:
        if history and not math.isfinite(history[-1]["train_loss"]):
            status = "diverged"
        elif patience is not None and epochs_since_best >= patience and len(history) < settings["epochs"]:
            status = "early_stopped"

    # The test set is evaluated once, on the weights chosen by validation.
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test = evaluate(model, data["test_images"], data["test_labels"], settings["eval_batch_size"], precision, channels_last)

    train_seconds = [row["train_seconds"] for row in history]
    # The first epoch pays warm-up (allocator, cuDNN autotuning, compilation),
    # so the mean leaves it out when later epochs exist.
    timed = train_seconds[1:] or train_seconds
    summary = {
        "run_id": run_id,
        "model": model_name,
        "settings": settings,
        "num_params": count_parameters(model),
        "device": describe_device(torch_device),
        "precision": precision,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__},
        "status": status,
        "epochs_run": len(history),
        "best_epoch": best["epoch"] or None,
        "best_val_acc": best["val_acc"] if best["epoch"] else None,
        "test_loss": test.loss,
        "test_acc": test.acc,
        "seconds_per_epoch": sum(timed) / len(timed) if timed else None,
    }

    write_csv(out_dir / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
    write_csv(out_dir / "grad_norms.csv", pd.DataFrame(grad_rows, columns=["epoch", "layer", "mean_norm", "max_norm"]))
    torch_save(out_dir / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    write_json(out_dir / "run.json", summary)
    resume_path.unlink(missing_ok=True)
    if gpu_slot is not None:
        gpu_slot.release()

    log.info(
        "%s %s after %d epochs: best val_acc %s at epoch %s, test_acc %.4f",
        run_id, status, len(history), f"{summary['best_val_acc']:.4f}" if summary["best_val_acc"] is not None else "n/a",
        summary["best_epoch"], test.acc,
    )
    return summary


def describe_device(device: torch.device) -> str:
    """Name the GPU, or the CPU model as /proc/cpuinfo gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    return f"cpu: {platform.processor() or platform.machine()}"


def _parse_settings(text: str) -> dict[str, Any]:
    """Read settings from a JSON string or, if ``text`` names a file, from that JSON file."""
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--settings {text!r} is neither a JSON object nor an existing JSON file")
        text = path.read_text()
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--settings is not valid JSON ({error}); pass a JSON object or a JSON file") from error
    if not isinstance(settings, dict):
        raise ConfigError(f"--settings must be a JSON object, got {type(settings).__name__}")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_study.train", description="Train one run of the CIFAR-10 study and write its files."
    )
    parser.add_argument("--run-id", required=True, help="run id, used in log lines and run.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings", help="JSON object (or file) with 'model' and every resolved setting")
    source.add_argument("--config", nargs="+", metavar="FILE",
                        help="config files (config.yaml, then overlays) that declare the run id")
    parser.add_argument("--data", required=True, help="prepared data file (results/data/cifar10.pt)")
    parser.add_argument("--out", required=True, help="run folder to write the run's files to")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present, else the CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--log", help="also append log lines to this file")
    args = parser.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)

    try:
        if args.config:
            study = build_study(load_config(*args.config))
            if args.run_id not in study.runs:
                raise ConfigError(f"run id {args.run_id!r} is not declared by {' '.join(args.config)}; "
                                  f"its runs are {', '.join(sorted(study.runs))}")
            run = study.runs[args.run_id]
            model_name, settings = run.model, dict(run.settings)
        else:
            settings = _parse_settings(args.settings)
            model_name = settings.pop("model", None)
        train_run(args.run_id, model_name, settings, args.data, args.out, device=args.device, threads=args.threads)
    except (ConfigError, DataError, CheckpointError, ValueError, OSError, RuntimeError) as error:
        log.error("%s failed: %s", args.run_id, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
