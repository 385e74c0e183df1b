"""Training one run on real CIFAR-10 images, without Snakemake."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cifar_study.config import ConfigError
from cifar_study.data import load_prepared
from cifar_study.engine import evaluate
from cifar_study.models import build_model
from cifar_study.train import HISTORY_COLUMNS, RESUME_FILE, make_optimizer, train_run

TIMING_COLUMNS = ["train_seconds", "eval_seconds"]

BASE = {
    "batch_size": 32, "eval_batch_size": 256, "optimizer": "adamw", "lr": 1e-3, "lr_schedule": "constant",
    "weight_decay": 5e-4, "momentum": 0.9, "epochs": 2, "early_stopping_patience": None, "seed": 42,
    "augment": True, "precision": "fp32", "compile": False,
}
MLP = {**BASE, "hidden_sizes": [64, 32], "activation": "relu", "dropout": 0.0}
MIXER = {**BASE, "patch_size": 8, "embed_dim": 64, "num_blocks": 2, "mlp_ratios": [0.5, 4.0], "dropout": 0.0,
         "activation": "gelu"}


def train(tmp_path, data, settings, model="mlp", name="run", **kwargs):
    out = tmp_path / name
    summary = train_run(name, model, settings, data, out, threads=1, **kwargs)
    return out, summary


def read_history(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv")


def test_run_writes_contract_files(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    for name in ("run.json", "history.csv", "grad_norms.csv", "model.pt"):
        assert (out / name).is_file(), name
    assert not (out / RESUME_FILE).exists()


def test_run_json_keys(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    summary = json.loads((out / "run.json").read_text())
    assert set(summary) >= {
        "run_id", "model", "settings", "num_params", "device", "precision", "versions", "status",
        "epochs_run", "best_epoch", "best_val_acc", "test_loss", "test_acc", "seconds_per_epoch",
    }
    assert summary["status"] == "completed"
    assert summary["epochs_run"] == 2
    assert 1 <= summary["best_epoch"] <= 2
    assert 0 <= summary["best_val_acc"] <= 1
    assert 0 <= summary["test_acc"] <= 1
    assert summary["settings"]["hidden_sizes"] == [64, 32]
    assert set(summary["versions"]) == {"python", "torch", "torchvision"}


def test_history_columns(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    history = read_history(out)
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]


def test_grad_norms_cover_every_layer(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    norms = pd.read_csv(out / "grad_norms.csv")
    names = [name for name, _ in build_model("mlp", hidden_sizes=[64, 32]).named_parameters()]
    assert norms[norms["epoch"] == 1]["layer"].tolist() == names
    assert (norms["max_norm"] >= norms["mean_norm"]).all()
    assert (norms["mean_norm"] > 0).all()


def test_model_loads_weights_only(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    state = torch.load(out / "model.pt", weights_only=True)
    model = build_model("mlp", hidden_sizes=[64, 32])
    model.load_state_dict(state)


def test_fp32_cpu_runs_are_identical(tmp_path, prepared_small):
    first, _ = train(tmp_path, prepared_small, MLP, name="first")
    second, _ = train(tmp_path, prepared_small, MLP, name="second")
    pd.testing.assert_frame_equal(read_history(first).drop(columns=TIMING_COLUMNS),
                                  read_history(second).drop(columns=TIMING_COLUMNS))
    pd.testing.assert_frame_equal(pd.read_csv(first / "grad_norms.csv"), pd.read_csv(second / "grad_norms.csv"))


def test_seed_changes_history(tmp_path, prepared_small):
    first, _ = train(tmp_path, prepared_small, MLP, name="first")
    other, _ = train(tmp_path, prepared_small, {**MLP, "seed": 7}, name="other")
    assert not read_history(first)["train_loss"].equals(read_history(other)["train_loss"])


def test_diverged_run_writes_everything(tmp_path, prepared_small):
    settings = {**MLP, "optimizer": "sgd", "momentum": 0.0, "lr": 1e12, "epochs": 4}
    out, summary = train(tmp_path, prepared_small, settings)
    assert summary["status"] == "diverged"
    assert summary["epochs_run"] < 4
    for name in ("run.json", "history.csv", "grad_norms.csv", "model.pt"):
        assert (out / name).is_file(), name
    json.loads((out / "run.json").read_text())


def test_early_stopping_restores_best(tmp_path, prepared_small):
    # A learning rate this high makes validation accuracy stall at once.
    settings = {**MLP, "lr": 0.5, "epochs": 30, "early_stopping_patience": 2}
    out, summary = train(tmp_path, prepared_small, settings)
    assert summary["status"] == "early_stopped"
    assert summary["epochs_run"] == summary["best_epoch"] + 2
    history = read_history(out)
    assert summary["best_val_acc"] == history["val_acc"].max()

    model = build_model("mlp", hidden_sizes=[64, 32])
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    data = load_prepared(prepared_small)
    val = evaluate(model, data["val_images"], data["val_labels"], 256, "fp32")
    assert val.acc == pytest.approx(summary["best_val_acc"])


@pytest.mark.parametrize(("name", "momentum", "kind"), [
    ("adam", 0.9, torch.optim.Adam), ("adamw", 0.9, torch.optim.AdamW),
    ("sgd", 0.0, torch.optim.SGD), ("sgd", 0.9, torch.optim.SGD),
])
def test_optimizer_honours_weight_decay(name, momentum, kind):
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    optimizer = make_optimizer(model, {"optimizer": name, "lr": 0.1, "weight_decay": 0.5, "momentum": momentum})
    assert isinstance(optimizer, kind)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    if kind is torch.optim.SGD:
        assert optimizer.param_groups[0]["momentum"] == momentum

    # With a zero gradient only weight decay moves the weights, towards zero.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert (model.weight.abs() < before.abs()).all()


def test_zero_weight_decay_keeps_weights():
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    optimizer = make_optimizer(model, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.0})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(model.weight, before)


def test_bad_settings_fail_before_training(tmp_path, prepared_small):
    with pytest.raises(ConfigError, match="patch_size"):
        train(tmp_path, prepared_small, {**MIXER, "patch_size": 5}, model="mlpmixer")
    assert not (tmp_path / "run" / "history.csv").exists()


def test_missing_setting_is_named(tmp_path, prepared_small):
    settings = {k: v for k, v in MLP.items() if k != "lr"}
    with pytest.raises(ConfigError, match="missing lr"):
        train(tmp_path, prepared_small, settings)


def test_threads_follow_request(tmp_path, prepared_small):
    train(tmp_path, prepared_small, {**MLP, "epochs": 1})
    assert torch.get_num_threads() == 1


def command(run_id, settings, model, data, out):
    return [
        sys.executable, "-m", "cifar_study.train", "--run-id", run_id,
        "--settings", json.dumps({"model": model, **settings}), "--data", str(data), "--out", str(out),
        "--threads", "1", "--log", str(out / "train.log"),
    ]


def test_log_has_one_line_per_epoch(tmp_path, prepared_small):
    out = tmp_path / "logged"
    subprocess.run(command("logged", MLP, "mlp", prepared_small, out), check=True, capture_output=True)
    lines = (out / "train.log").read_text().splitlines()
    epoch_lines = [line for line in lines if " epoch " in line and "train_loss" in line]
    assert len(epoch_lines) == 2
    assert all("logged epoch" in line for line in epoch_lines)


def test_progress_bar_on_terminal(tmp_path, prepared_small):
    main, child = pty.openpty()
    process = subprocess.Popen(command("tty", {**MLP, "epochs": 1}, "mlp", prepared_small, tmp_path / "tty"),
                               stdout=child, stderr=child)
    os.close(child)
    output = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=60)
    assert b"[###" in output


def test_no_progress_bar_in_log(tmp_path, prepared_small):
    out = tmp_path / "plain"
    process = subprocess.run(command("plain", MLP, "mlp", prepared_small, out), capture_output=True, text=True, check=True)
    assert "[###" not in process.stderr


def test_killed_run_resumes_identically(tmp_path, prepared_small):
    # Large enough that an epoch takes about a second on 2 CPU cores.
    settings = {**MIXER, "patch_size": 4, "embed_dim": 256, "epochs": 3}
    reference = tmp_path / "reference"
    subprocess.run(command("reference", settings, "mlpmixer", prepared_small, reference), check=True, capture_output=True)

    # Kill the job in its second epoch, after the first epoch's checkpoint.
    out = tmp_path / "killed"
    process = subprocess.Popen(command("killed", settings, "mlpmixer", prepared_small, out),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / RESUME_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / RESUME_FILE).exists()
    assert not (out / "run.json").exists()
    assert not (out / "history.csv").exists()

    subprocess.run(command("killed", settings, "mlpmixer", prepared_small, out), check=True, capture_output=True)
    pd.testing.assert_frame_equal(read_history(out).drop(columns=TIMING_COLUMNS),
                                  read_history(reference).drop(columns=TIMING_COLUMNS))
    pd.testing.assert_frame_equal(pd.read_csv(out / "grad_norms.csv"), pd.read_csv(reference / "grad_norms.csv"))
    resumed = torch.load(out / "model.pt", weights_only=True)
    uninterrupted = torch.load(reference / "model.pt", weights_only=True)
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not (out / RESUME_FILE).exists()
    assert "resuming after epoch" in (out / "train.log").read_text()


def test_checkpoint_of_other_settings_is_ignored(tmp_path, prepared_small):
    out, _ = train(tmp_path, prepared_small, MLP)
    first = read_history(out)
    # A leftover checkpoint from other settings must not leak into this run.
    torch.save({"settings": {"lr": 1}, "data_digest": None}, out / RESUME_FILE)
    train(tmp_path, prepared_small, MLP)
    pd.testing.assert_frame_equal(read_history(out).drop(columns=TIMING_COLUMNS), first.drop(columns=TIMING_COLUMNS))


def test_damaged_checkpoint_is_named(tmp_path, prepared_small):
    from cifar_study.train import CheckpointError

    out = tmp_path / "run"
    out.mkdir()
    (out / RESUME_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="delete it to train this run from scratch"):
        train(tmp_path, prepared_small, MLP)


def test_stale_temporary_is_removed(tmp_path, prepared_small):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".resume.pt.123.tmp").write_bytes(b"partial")
    train(tmp_path, prepared_small, {**MLP, "epochs": 1})
    assert not (out / ".resume.pt.123.tmp").exists()


def test_second_trainer_of_run_fails(tmp_path, prepared_small):
    from cifar_study.train import CheckpointError, lock_run_folder

    out = tmp_path / "run"
    out.mkdir()
    holder = lock_run_folder(out, "run")
    try:
        with pytest.raises(CheckpointError, match="already being trained"):
            train(tmp_path, prepared_small, MLP)
    finally:
        holder.close()
    assert not (out / "history.csv").exists()


def test_cli_reports_missing_settings_file(tmp_path, prepared_small):
    process = subprocess.run(
        [sys.executable, "-m", "cifar_study.train", "--run-id", "x", "--settings", str(tmp_path / "nope.json"),
         "--data", str(prepared_small), "--out", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert process.returncode == 1
    assert "neither a JSON object nor an existing JSON file" in process.stderr
