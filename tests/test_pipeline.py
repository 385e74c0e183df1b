"""The training stage through real Snakemake: scheduling, the smoke preset and bad input."""

from __future__ import annotations

import json
import re
import time

import pandas as pd
import torch
import yaml

from conftest import REPO, copy_workflow, data_overlay, run_snakemake

from cifar_study.config import build_study, load_config


def scheduled_runs(output: str) -> list[str]:
    """Return the run ids of the train jobs that a ``snakemake -n`` output lists."""
    return re.findall(r"wildcards: run_id=(\S+)", output)


def full_study():
    return build_study(yaml.safe_load((REPO / "config.yaml").read_text()))


def smoke_study():
    return build_study(load_config(REPO / "config.yaml", REPO / "presets" / "smoke.yaml"))


def test_dry_run_lists_each_run_once(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    process = run_snakemake(workdir, "-n", "--config", "data={root: /nonexistent}")
    runs = scheduled_runs(process.stdout)
    assert sorted(runs) == sorted(full_study().runs)
    assert len(runs) == len(set(runs)) == 24


def test_dry_run_is_fast(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    run_snakemake(workdir, "-n")
    start = time.monotonic()
    run_snakemake(workdir, "-n", "--quiet")
    # Not a benchmark: a generous bound that catches an import of torch at parse time.
    assert time.monotonic() - start < 30


def test_invalid_config_fails_before_jobs(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    (workdir / "bad.yaml").write_text("experiments:\n  mlpmixer_patch:\n    sweep:\n      patch_size: [5]\n")
    process = run_snakemake(workdir, "--cores", "1", "--configfile", "config.yaml", "bad.yaml", check=False)
    assert process.returncode != 0
    assert "patch_size: invalid value 5" in process.stdout + process.stderr
    assert not (workdir / "results").exists()


def test_schema_rejects_typo(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    (workdir / "bad.yaml").write_text("data:\n  roots: /data\n")
    process = run_snakemake(workdir, "-n", "--configfile", "config.yaml", "bad.yaml", check=False)
    assert process.returncode != 0
    assert "'roots' was unexpected" in process.stdout + process.stderr


def test_missing_data_fails_at_once(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    (workdir / "nodata.yaml").write_text("data:\n  root: /nonexistent/cifar10\n  download: false\n")
    start = time.monotonic()
    process = run_snakemake(
        workdir, "--cores", "1", "--configfile", "config.yaml", "presets/smoke.yaml", "nodata.yaml", check=False,
    )
    assert process.returncode != 0
    log = (workdir / "results/logs/prepare_data.log").read_text()
    assert "/nonexistent/cifar10" in log
    assert "image folder" in log
    assert time.monotonic() - start < 60
    assert not (workdir / "results/runs").exists()


def test_unknown_run_is_not_a_target(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    process = run_snakemake(workdir, "-n", "results/runs/vgg__lr=1/run.json", check=False)
    assert process.returncode != 0
    assert "MissingRuleException" in process.stderr or "No rule to produce" in process.stdout + process.stderr


def test_smoke_trains_every_run(smoke_workdir):
    study = smoke_study()
    runs_dir = smoke_workdir / "results" / "runs"
    assert sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) == sorted(study.runs)
    for run_id in study.runs:
        for name in ("run.json", "history.csv", "grad_norms.csv", "model.pt", "train.log"):
            assert (runs_dir / run_id / name).is_file(), f"{run_id}/{name}"


def test_smoke_runs_follow_contract(smoke_workdir):
    for run_dir in sorted((smoke_workdir / "results" / "runs").iterdir()):
        summary = json.loads((run_dir / "run.json").read_text())
        assert summary["run_id"] == run_dir.name
        assert summary["status"] in ("completed", "early_stopped", "diverged")
        history = pd.read_csv(run_dir / "history.csv")
        assert len(history) == summary["epochs_run"]
        assert history["epoch"].tolist() == list(range(1, summary["epochs_run"] + 1))
        state = torch.load(run_dir / "model.pt", weights_only=True)
        assert sum(t.numel() for k, t in state.items() if "running" not in k and "num_batches" not in k) == summary["num_params"]
        assert not (run_dir / "resume.pt").exists()


def test_smoke_uses_subset(smoke_workdir):
    summary = json.loads((smoke_workdir / "results" / "data" / "cifar10.json").read_text())
    assert summary["source"] == "image_folder"
    assert (summary["num_train"], summary["num_val"], summary["num_test"]) == (200, 100, 100)


def test_smoke_early_stopping_settings(smoke_workdir):
    runs_dir = smoke_workdir / "results" / "runs"
    for run_dir in runs_dir.glob("*early_stopping_patience=1*"):
        summary = json.loads((run_dir / "run.json").read_text())
        assert summary["settings"]["epochs"] == 3
        assert summary["epochs_run"] <= 3


def test_finished_pipeline_schedules_nothing(smoke_workdir, cifar_root):
    process = run_snakemake(smoke_workdir, "-n", "--configfile", "config.yaml", "presets/smoke.yaml",
                            *data_overlay(cifar_root))
    assert "Nothing to be done" in process.stdout + process.stderr


def test_workflow_lint_is_clean(tmp_path):
    workdir = copy_workflow(tmp_path / "flow")
    process = run_snakemake(workdir, "--lint")
    assert "Congratulations" in process.stdout + process.stderr
