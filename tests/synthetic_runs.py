"""Synthetic run folders for the report-stage tests.

Each folder follows the run-file contract of the training stage (run.json,
history.csv, grad_norms.csv, model.pt, train.log) with made-up metrics, but
with the state dict and parameter names of a real model built by
``cifar_study.models.build_model``, so the weight figures read real shapes.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from cifar_study.config import MODEL_ARGS, build_study
from cifar_study.models import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


def write_run(
    run_dir: Path,
    run_id: str,
    model: str,
    settings: dict[str, Any],
    *,
    best_val_acc: float,
    epochs: int = 4,
    status: str = "completed",
    seconds_per_epoch: float = 1.5,
    seed: int = 0,
) -> Path:
    """Write one run folder; a diverged run gets NaN and inf losses in its last history row."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = build_model(model, **{k: v for k, v in settings.items() if k in MODEL_ARGS[model]})
    torch.save(net.state_dict(), run_dir / "model.pt")

    # Accuracies rise towards best_val_acc, reached at the last epoch unless the run diverged.
    epoch = np.arange(1, epochs + 1)
    progress = epoch / epochs
    val_acc = 0.1 + (best_val_acc - 0.1) * progress
    history = pd.DataFrame(
        {
            "epoch": epoch,
            "train_loss": 2.3 * (1.1 - progress),
            "train_acc": np.minimum(val_acc + 0.05 * progress, 1.0),
            "val_loss": 2.3 * (1.15 - progress),
            "val_acc": val_acc,
            "lr": settings.get("lr", 1e-3),
            "train_seconds": seconds_per_epoch,
            "eval_seconds": 0.25,
        }
    )
    best_epoch = epochs
    if status == "diverged":
        history.loc[history.index[-1], ["train_loss", "val_loss"]] = [math.nan, math.inf]
        history.loc[history.index[-1], ["train_acc", "val_acc"]] = [0.1, 0.1]
        best_epoch = max(epochs - 1, 1)
        best_val_acc = float(history["val_acc"].iloc[best_epoch - 1])
    history.to_csv(run_dir / "history.csv", index=False)

    rows = []
    for e in epoch:
        for depth, (name, _) in enumerate(net.named_parameters()):
            mean_norm = float(rng.uniform(0.5, 2.0) * 10 ** (-depth / 20))
            if status == "diverged" and e == epochs:
                mean_norm = math.inf
            rows.append({"epoch": e, "layer": name, "mean_norm": mean_norm, "max_norm": 2 * mean_norm})
    pd.DataFrame(rows).to_csv(run_dir / "grad_norms.csv", index=False)

    record = {
        "run_id": run_id,
        "model": model,
        "settings": settings,
        "num_params": count_parameters(net),
        "device": "cpu",
        "precision": "fp32",
        "versions": {"python": "3.12.0", "torch": torch.__version__, "torchvision": "0.29.1"},
        "status": status,
        "epochs_run": epochs,
        "best_epoch": best_epoch,
        "best_val_acc": best_val_acc,
        "test_loss": 1.2,
        "test_acc": best_val_acc - 0.01,
        "seconds_per_epoch": seconds_per_epoch,
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    (run_dir / "train.log").write_text(f"{run_id}: synthetic run\n")
    return run_dir


def small_config() -> dict[str, Any]:
    """Return config.yaml with small models and short sweeps, so every run is cheap to write.

    The six experiments keep their ids and sweep keys. An added experiment has
    a title full of LaTeX special characters and sweeps two keys with two seeds.
    """
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["models"]["mlp"]["hidden_sizes"] = [32, 16]
    config["models"]["resnet18"]["widths"] = [64, 8, 8, 8]
    config["models"]["resnet18"]["blocks"] = [1, 1, 1, 1]
    # Token-mixing hidden width 4.0 * 32 = 128: two pages of 64 units.
    config["models"]["mlpmixer"].update(embed_dim=32, num_blocks=2, mlp_ratios=[4.0, 0.5])
    experiments = config["experiments"]
    experiments["mlpmixer_patch"]["sweep"] = {"patch_size": [4, 8]}
    experiments["mlpmixer_blocks"]["settings"]["embed_dim"] = 32
    experiments["mlpmixer_blocks"]["sweep"] = {"num_blocks": [1, 2]}
    experiments["mlpmixer_width"]["sweep"] = {"embed_dim": [16, 32]}
    experiments["extra_dropout"] = {
        "title": "Dropout & width_1 at 50% {test} $x$ #1 ~^\\",
        "model": "mlp",
        "sweep": {"dropout": [0.0, 0.25], "activation": ["relu", "gelu"]},
        "seeds": [1, 2],
    }
    return config


def accuracy_for(run_id: str) -> float:
    """Return a made-up best validation accuracy in [0.3, 0.8], fixed per run id."""
    return 0.3 + 0.5 * (zlib.crc32(run_id.encode()) % 1000) / 1000


def write_study_runs(config: dict[str, Any], runs_dir: Path) -> dict[str, Path]:
    """Write a synthetic folder for every run of ``config``; runs at lr 0.1 diverge. Return folders by run id."""
    study = build_study(config)
    folders = {}
    for index, (run_id, run) in enumerate(study.runs.items()):
        status = "diverged" if run.settings.get("lr") == 0.1 else "completed"
        if run.settings.get("early_stopping_patience") and index % 2:
            status = "early_stopped"
        folders[run_id] = write_run(
            runs_dir / run_id,
            run_id,
            run.model,
            run.settings,
            best_val_acc=accuracy_for(run_id),
            status=status,
            seconds_per_epoch=1.0 + index / 10,
            seed=index,
        )
    return folders
