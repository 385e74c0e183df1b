"""Reruns through Snakemake: what a change schedules, and a job killed mid-epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import yaml

from conftest import SNAKEMAKE, copy_workflow, data_overlay, run_snakemake


def scheduled_jobs(output: str) -> dict[str, int]:
    """Return the job counts of the ``Job stats`` table of a ``snakemake -n`` output."""
    counts = {}
    table = output.split("Job stats:", 1)[-1]
    for line in table.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def dry_run(workdir, cifar_root, *extra, env=None):
    args = ["-n", "--configfile", "config.yaml", "presets/smoke.yaml", *extra, *data_overlay(cifar_root)]
    process = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=300)
    assert process.returncode == 0, process.stdout + process.stderr
    return process.stdout + process.stderr


def test_rerun_ignores_hash_seed(smoke_workdir, cifar_root):
    for seed in ("1", "12345"):
        output = dry_run(smoke_workdir, cifar_root, env={**os.environ, "PYTHONHASHSEED": seed})
        assert "Nothing to be done" in output


def test_rerun_ignores_key_order(smoke_workdir, cifar_root):
    config = yaml.safe_load((smoke_workdir / "config.yaml").read_text())
    reordered = {key: config[key] for key in reversed(list(config))}
    reordered["defaults"] = dict(reversed(list(config["defaults"].items())))
    (smoke_workdir / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    args = ["-n", "--configfile", "reordered.yaml", "presets/smoke.yaml", *data_overlay(cifar_root)]
    process = run_snakemake(smoke_workdir, *args)
    assert "Nothing to be done" in process.stdout + process.stderr


def test_changed_setting_reruns_one_run(smoke_workdir, cifar_root):
    (smoke_workdir / "one_lr.yaml").write_text(
        "experiments:\n  resnet18_lr:\n    sweep:\n      lr: [0.1, 0.01, 1.0e-3, 1.0e-4, 2.0e-5]\n"
    )
    output = dry_run(smoke_workdir, cifar_root, "one_lr.yaml")
    assert scheduled_jobs(output).get("train") == 1
    assert "run_id=resnet18__lr=2e-05__optimizer=adam__weight_decay=0" in output
    assert "prepare_data" not in scheduled_jobs(output)


def test_changed_default_reruns_its_runs(smoke_workdir, cifar_root):
    (smoke_workdir / "mlp_dropout.yaml").write_text("models:\n  mlp:\n    dropout: 0.1\n")
    output = dry_run(smoke_workdir, cifar_root, "mlp_dropout.yaml")
    # The MLP's default changes the three MLP runs and no other.
    assert scheduled_jobs(output).get("train") == 3


def test_killed_snakemake_job_resumes(tmp_path, cifar_root):
    workdir = copy_workflow(tmp_path / "flow")
    (workdir / "slow.yaml").write_text("defaults:\n  epochs: 3\n")
    run_id = "resnet18__lr=0.01__optimizer=adam__weight_decay=0"
    target = f"results/runs/{run_id}/run.json"
    # Targets go first: --configfile and --config take every value after them.
    args = [target, "--cores", "2", "--configfile", "config.yaml", "presets/smoke.yaml", "slow.yaml",
            *data_overlay(cifar_root)]

    # Kill Snakemake and its job together once the first epoch is saved.
    process = subprocess.Popen([*SNAKEMAKE, *args], cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    resume = workdir / "results" / "runs" / run_id / "resume.pt"
    deadline = time.monotonic() + 300
    while not resume.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert resume.exists()
    assert not (workdir / target).exists()

    # A killed Snakemake leaves its lock behind, and --unlock removes it.
    run_snakemake(workdir, "--unlock", *args)
    run_snakemake(workdir, "--rerun-incomplete", *args)
    summary = json.loads((workdir / target).read_text())
    assert summary["epochs_run"] == 3
    assert "resuming after epoch" in (workdir / "results" / "runs" / run_id / "train.log").read_text()
    assert not resume.exists()


def test_plotting_code_change_skips_training(smoke_workdir, cifar_root):
    import cifar_study.figures

    code = Path(cifar_study.figures.__file__)
    source = code.read_bytes()
    stat = code.stat()
    try:
        # An edit of the plotting module, undone below.
        code.write_bytes(source + b"\n# edited\n")
        jobs = scheduled_jobs(dry_run(smoke_workdir, cifar_root))
    finally:
        code.write_bytes(source)
        os.utime(code, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "train" not in jobs
    assert "prepare_data" not in jobs
    assert jobs.get("curves") == 6
    assert jobs.get("report") == 1
