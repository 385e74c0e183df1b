"""Training on a real SLURM cluster through profiles/slurm: the smoke preset, what each job
requests, and failed, cancelled and preempted jobs.

The tests start a single-node cluster on loopback with ``.ci/slurm-up``, which needs root
on Debian 12 and installs the SLURM packages when they are missing, and stop it with
``.ci/slurm-down`` at the end. Set CIFAR_STUDY_SLURM_STATE to choose the cluster's state
folder. A cluster already running from that folder is used and left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, copy_workflow, data_overlay

from cifar_study.config import build_study, load_config

ACCOUNT = "cifar"
PARTITION = "debug"
# A partition whose jobs preempt and requeue the jobs of PARTITION.
URGENT_PARTITION = "urgent"

RUN_FILES = ("run.json", "history.csv", "grad_norms.csv", "model.pt", "train.log")
# Smoke-scale runs that take long enough to be stopped mid-training. ResNet18 trains an
# epoch of 200 images in 3 to 4 s on one core of a 2-core machine, and SLOW_OVERLAY gives
# it 3 epochs.
SLOW_OVERLAY = "defaults:\n  epochs: 3\n"
CANCELLED_RUN = "resnet18__lr=0.01__optimizer=adam__weight_decay=0"
PREEMPTED_RUN = "resnet18__optimizer=adam__weight_decay=0"
FAILED_RUN = "mlp__activation=tanh"

# Seconds that one Snakemake invocation may take before `timeout` stops it.
SMOKE_LIMIT = 1200
RUN_LIMIT = 300


def slurm_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".ci" / name), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """Start the single-node SLURM cluster with .ci/slurm-up, yield its state folder, and stop it."""
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM tests start a cluster with .ci/slurm-up, which must run as root "
            "(it installs packages and writes /etc/slurm); run pytest as root",
            pytrace=False,
        )
    state_env = os.environ.get("CIFAR_STUDY_SLURM_STATE")
    if state_env:
        state_dir = Path(state_env)
    else:
        # Not under pytest's temporary folder, whose mode 700 keeps out the users slurm and mysql.
        state_dir = Path(tempfile.mkdtemp(prefix="cifar-study-slurm-"))
        state_dir.chmod(0o755)

    # Installing the packages on a fresh machine takes a few minutes (an estimate).
    up = slurm_script("slurm-up", str(state_dir), timeout=1200)
    # slurm-up does nothing when the cluster of this state folder is running already.
    started = up.returncode != 0 or "already running" not in up.stdout
    try:
        if up.returncode != 0:
            pytest.fail(f".ci/slurm-up {state_dir} failed ({up.returncode}):\n{up.stdout}\n{up.stderr}", pytrace=False)
        yield state_dir
    finally:
        # slurm-down stops only the daemons whose PID files slurm-up wrote, also after a failed start.
        if started:
            down = slurm_script("slurm-down", str(state_dir))
            assert down.returncode == 0, f".ci/slurm-down {state_dir} failed:\n{down.stdout}\n{down.stderr}"
        if not state_env:
            shutil.rmtree(state_dir, ignore_errors=True)


def smoke_study():
    return build_study(load_config(REPO / "config.yaml", REPO / "presets" / "smoke.yaml"))


def smoke_train_resources() -> dict:
    return load_config(REPO / "config.yaml", REPO / "presets" / "smoke.yaml")["resources"]["train"]


def snakemake_command(cifar_root: Path, *targets: str, overlays: tuple[str, ...] = (),
                      options: tuple[str, ...] = (), limit: int = RUN_LIMIT) -> list[str]:
    """Return the command that runs ``targets`` of the smoke preset through profiles/slurm.

    ``timeout`` stops Snakemake, which ignores SIGTERM while it waits on jobs, and
    ``--default-resources`` comes last because it takes all the values that follow it.
    """
    return [
        "timeout", "-k", "10", str(limit), *SNAKEMAKE, *targets,
        "--configfile", "config.yaml", "presets/smoke.yaml", *overlays,
        *data_overlay(cifar_root),
        "--profile", "profiles/slurm",
        "--slurm-init-seconds-before-status-checks", "2",
        *options,
        "--default-resources", f"slurm_account={ACCOUNT}", f"slurm_partition={PARTITION}",
    ]


def slurm_query(*args: str) -> str:
    process = subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert process.returncode == 0, f"{' '.join(args)} failed:\n{process.stderr}"
    return process.stdout


def active_jobs(workdir: Path) -> list[dict[str, str]]:
    """Return the pending and running SLURM jobs submitted from ``workdir``, each with its id, state and comment."""
    jobs = []
    for line in slurm_query("squeue", "-h", "-o", "%i|%T|%k|%Z").splitlines():
        job_id, state, comment, job_workdir = line.split("|", 3)
        if Path(job_workdir) == workdir:
            jobs.append({"id": job_id, "state": state, "comment": comment})
    return jobs


def cancel_jobs(workdir: Path) -> None:
    """Cancel the jobs that an interrupted Snakemake left in the queue, so later tests get the node."""
    job_ids = [job["id"] for job in active_jobs(workdir)]
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)


def run_on_slurm(workdir: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in ``workdir`` and fail the test if ``timeout`` stopped Snakemake."""
    try:
        process = subprocess.run(
            command, cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    finally:
        cancel_jobs(workdir)
    if process.returncode in (124, 137):
        pytest.fail(f"snakemake timed out:\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}")
    return process


def start_on_slurm(workdir: Path, command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` in ``workdir`` in the background, its output going to ``log``."""
    with log.open("w") as output:
        return subprocess.Popen(
            command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )


def wait_for_running_job(workdir: Path, run_id: str, process: subprocess.Popen, timeout: float = 240) -> str:
    """Wait until the train job of ``run_id`` runs and has saved an epoch, and return its SLURM job id."""
    resume = workdir / "results" / "runs" / run_id / "resume.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"snakemake ended ({process.returncode}) before the first epoch of {run_id}"
        if resume.exists():
            for job in active_jobs(workdir):
                if job["comment"] == f"rule_train_wildcards_{run_id}" and job["state"] == "RUNNING":
                    return job["id"]
        time.sleep(0.2)
    pytest.fail(f"no running job of {run_id} with a resume checkpoint after {timeout:.0f} s")


def wait_for_exit(process: subprocess.Popen, workdir: Path, log: Path, timeout: float = RUN_LIMIT) -> str:
    """Wait for the background Snakemake and return its output."""
    try:
        process.wait(timeout=timeout)
    finally:
        # The command runs under `timeout`, so it ends by itself. This only guards against a hung test.
        if process.poll() is None:
            process.kill()
            process.wait()
        cancel_jobs(workdir)
    return log.read_text()


def sacct_jobs(*selection: str) -> list[dict[str, str]]:
    """Return the sacct records (one per job, steps left out) of the jobs that ``selection`` picks."""
    fields = ["JobID", "JobName", "Comment", "WorkDir", "Partition", "Account", "AllocCPUS", "ReqMem",
              "TimelimitRaw", "AllocTRES", "State"]
    # sacct lists only jobs that started since midnight unless given a start time.
    start = (datetime.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    output = slurm_query("sacct", "-X", "-P", "-n", "-S", start, "-o", ",".join(fields), *selection)
    return [dict(zip(fields, line.split("|"))) for line in output.splitlines()]


def parse_tres(tres: str) -> dict[str, str]:
    """Parse a TRES list such as ``billing=1,cpu=1,gres/gpu=1,mem=2000M,node=1``."""
    return dict(item.split("=", 1) for item in tres.split(",") if item)


def memory_mb(value: str) -> int:
    """Convert a SLURM memory size such as ``2000M`` or ``2G`` to megabytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)[nc]?", value)
    assert match, f"unexpected memory size {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "M"
    return round(number * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit])


def executed_rules(output: str) -> dict[str, set[str]]:
    """Return the rules that a Snakemake output ran, split into SLURM ("rule") and local ("localrule")."""
    rules: dict[str, set[str]] = {"rule": set(), "localrule": set()}
    for kind, name in re.findall(r"^(rule|localrule) (\w+):$", output, re.MULTILINE):
        rules[kind].add(name)
    return rules


def slurm_error_reports(output: str) -> list[str]:
    """Return the "Error in rule" reports that the submitting Snakemake printed for failed SLURM jobs.

    The job's own Snakemake prints reports too, inside the SLURM log that the submitting
    one shows. Only the submitting one's reports contain the SLURM state.
    """
    reports = re.findall(r"^Error in rule (\w+:\n(?:    .*\n)+)", output, re.MULTILINE)
    return [report for report in reports if "SLURM-job" in report]


def slow_flow(tmp_path: Path) -> Path:
    """Copy the workflow into ``tmp_path`` with slow.yaml, the SLOW_OVERLAY config overlay."""
    workdir = copy_workflow(tmp_path / "flow")
    (workdir / "slow.yaml").write_text(SLOW_OVERLAY)
    return workdir


@dataclass(frozen=True)
class SmokeRun:
    workdir: Path
    process: subprocess.CompletedProcess

    @property
    def output(self) -> str:
        return self.process.stdout + self.process.stderr


@pytest.fixture(scope="module")
def slurm_smoke(slurm_cluster, tmp_path_factory, cifar_root) -> SmokeRun:
    """Run the default target of the smoke preset through profiles/slurm once."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm_smoke"))
    process = run_on_slurm(workdir, snakemake_command(cifar_root, limit=SMOKE_LIMIT))
    return SmokeRun(workdir, process)


def test_smoke_on_slurm_finishes(slurm_smoke, cifar_root):
    assert slurm_smoke.process.returncode == 0, slurm_smoke.output[-8000:]
    runs_dir = slurm_smoke.workdir / "results" / "runs"
    study = smoke_study()
    assert sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) == sorted(study.runs)
    for run_id in study.runs:
        for name in RUN_FILES:
            assert (runs_dir / run_id / name).is_file(), f"{run_id}/{name}"
        summary = json.loads((runs_dir / run_id / "run.json").read_text())
        assert summary["run_id"] == run_id
        assert summary["status"] in ("completed", "early_stopped", "diverged")
        assert len(pd.read_csv(runs_dir / run_id / "history.csv")) == summary["epochs_run"]
        assert not (runs_dir / run_id / "resume.pt").exists()

    # Every input of the default target exists and is up to date.
    dry_run = subprocess.run(
        [*SNAKEMAKE, "-n", "--configfile", "config.yaml", "presets/smoke.yaml", *data_overlay(cifar_root)],
        cwd=slurm_smoke.workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "Nothing to be done" in dry_run.stdout + dry_run.stderr


def test_slurm_jobs_request_train_resources(slurm_smoke):
    assert slurm_smoke.process.returncode == 0, slurm_smoke.output[-8000:]
    # The plugin gives every job of one Snakemake invocation the same name, a UUID that
    # Snakemake prints as the "SLURM run ID".
    run_uuid = re.search(r"SLURM run ID: (\S+)", slurm_smoke.output).group(1)
    jobs = sacct_jobs("--name", run_uuid)
    study = smoke_study()
    resources = smoke_train_resources()

    # The plugin puts rule_<rule>_wildcards_<values> in each job's comment, so the comments
    # show one job per training run and none for the local rules.
    assert len(jobs) == len(study.runs)
    assert sorted(job["Comment"] for job in jobs) == sorted(f"rule_train_wildcards_{run_id}" for run_id in study.runs)
    for job in jobs:
        tres = parse_tres(job["AllocTRES"])
        assert job["State"] == "COMPLETED", job
        assert Path(job["WorkDir"]) == slurm_smoke.workdir, job
        assert tres.get("gres/gpu") == "1", job
        assert int(job["AllocCPUS"]) == resources["threads"], job
        assert memory_mb(job["ReqMem"]) == resources["mem_mb"], job
        assert int(job["TimelimitRaw"]) == resources["runtime"], job
        assert job["Account"] == ACCOUNT, job
        assert job["Partition"] == PARTITION, job

    # Data preparation, figures, tables and the report ran on the submitting host.
    rules = executed_rules(slurm_smoke.output)
    assert rules["rule"] == {"train"}
    assert {"prepare_data", "all"} <= rules["localrule"]


def test_failed_slurm_job_reruns(slurm_cluster, tmp_path, cifar_root):
    workdir = copy_workflow(tmp_path / "flow")
    run_dir = workdir / "results" / "runs" / FAILED_RUN
    target = f"results/runs/{FAILED_RUN}/run.json"
    run_dir.mkdir(parents=True)
    (run_dir / "resume.pt").write_bytes(b"not a checkpoint")

    failed = run_on_slurm(workdir, snakemake_command(cifar_root, target))
    output = failed.stdout + failed.stderr
    reports = slurm_error_reports(output)
    assert failed.returncode != 0
    assert len(reports) == 1, output[-8000:]
    assert reports[0].startswith("train:")
    assert "SLURM status is: 'FAILED'" in reports[0]
    assert target in reports[0]
    # show-failed-logs prints the job's train.log.
    assert "cannot read resume checkpoint" in output
    assert not (workdir / target).exists()

    (run_dir / "resume.pt").unlink()
    rerun = run_on_slurm(workdir, snakemake_command(cifar_root, target))
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-8000:]
    summary = json.loads((workdir / target).read_text())
    assert summary["status"] == "completed"
    assert summary["epochs_run"] == 2


def test_cancelled_slurm_job_resumes(slurm_cluster, tmp_path, cifar_root):
    workdir = slow_flow(tmp_path)
    run_dir = workdir / "results" / "runs" / CANCELLED_RUN
    target = f"results/runs/{CANCELLED_RUN}/run.json"
    # In sacct status mode, plugin 2.8.0 does not recognise the state "CANCELLED by 0"
    # of a cancelled job and waits for it forever. squeue shows "CANCELLED".
    command = snakemake_command(cifar_root, target, overlays=("slow.yaml",),
                                options=("--slurm-status-command", "squeue"))
    log = tmp_path / "cancelled.log"
    process = start_on_slurm(workdir, command, log)
    job_id = wait_for_running_job(workdir, CANCELLED_RUN, process)
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    output = wait_for_exit(process, workdir, log)

    reports = slurm_error_reports(output)
    assert process.returncode not in (124, 137), f"snakemake timed out:\n{output[-8000:]}"
    assert process.returncode != 0
    assert len(reports) == 1, output[-8000:]
    assert reports[0].startswith("train:")
    assert "SLURM status is: 'CANCELLED'" in reports[0]
    assert target in reports[0]
    assert sacct_jobs("-j", job_id)[0]["State"].startswith("CANCELLED")
    assert (run_dir / "resume.pt").is_file()
    assert not (workdir / target).exists()

    rerun = run_on_slurm(workdir, snakemake_command(cifar_root, target, overlays=("slow.yaml",)))
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-8000:]
    assert "resuming after epoch" in (run_dir / "train.log").read_text()
    summary = json.loads((workdir / target).read_text())
    assert summary["epochs_run"] == 3
    assert pd.read_csv(run_dir / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert not (run_dir / "resume.pt").exists()


def node_gpus() -> int:
    """Return the number of GPUs on the cluster's node, from its ``gpu:N`` generic resource."""
    gres = slurm_query("sinfo", "-h", "-o", "%G").split()[0]
    return int(re.fullmatch(r"gpu(?::\w+)?:(\d+)(?:\(.*\))?", gres).group(1))


def test_preempted_slurm_job_resumes(slurm_cluster, tmp_path, cifar_root):
    workdir = slow_flow(tmp_path)
    run_dir = workdir / "results" / "runs" / PREEMPTED_RUN
    target = f"results/runs/{PREEMPTED_RUN}/run.json"
    log = tmp_path / "preempted.log"
    process = start_on_slurm(workdir, snakemake_command(cifar_root, target, overlays=("slow.yaml",)), log)
    job_id = wait_for_running_job(workdir, PREEMPTED_RUN, process)

    # A job in the higher-priority partition that needs every GPU of the node, so SLURM
    # must preempt the training job, which it requeues.
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", URGENT_PARTITION, "-A", ACCOUNT, f"--gpus={node_gpus()}",
         "-c", "1", "--mem", "100", "-t", "1", "-J", "cifar-study-urgent", "-o", "/dev/null",
         "-D", str(tmp_path), "--wrap", "sleep 2"],
        capture_output=True, text=True, timeout=60,
    )
    assert urgent.returncode == 0, urgent.stderr
    output = wait_for_exit(process, workdir, log)

    assert process.returncode == 0, output[-8000:]
    assert "resuming after epoch" in (run_dir / "train.log").read_text()
    summary = json.loads((workdir / target).read_text())
    assert summary["epochs_run"] == 3
    assert pd.read_csv(run_dir / "history.csv")["epoch"].tolist() == [1, 2, 3]
    # With --duplicates, sacct lists the preempted start of the job besides the last one.
    states = [job["State"] for job in sacct_jobs("--duplicates", "-j", job_id)]
    assert "PREEMPTED" in states or "REQUEUED" in states, states
    assert states[-1] == "COMPLETED", states
