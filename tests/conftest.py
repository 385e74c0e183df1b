"""Fixtures shared by the tests: the real CIFAR-10 images and a smoke-scale pipeline run.

The tests run on real CIFAR-10. Point them at the data with one of
    CIFAR10_ROOT=/path/to/cifar10        an unpacked image folder or torchvision root
    CIFAR10_ARCHIVE=/path/to/cifar10-jpeg.tar.gz   an archive of the image folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SNAKEMAKE = [PYTHON, "-m", "snakemake"]

# Files of the repository that a pipeline run needs; results and caches stay behind.
WORKFLOW_FILES = ("Snakefile", "config.yaml", "environment.yml", "presets", "profiles", "workflow", "report")


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """Return a folder with the real CIFAR-10 images, unpacking the archive if needed."""
    root = os.environ.get("CIFAR10_ROOT")
    if root:
        return Path(root)
    archive = os.environ.get("CIFAR10_ARCHIVE")
    if not archive or not Path(archive).is_file():
        pytest.fail(
            "the tests need the real CIFAR-10 images: set CIFAR10_ROOT to an unpacked image folder "
            "or CIFAR10_ARCHIVE to cifar10-jpeg.tar.gz",
            pytrace=False,
        )
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def copy_workflow(target: Path) -> Path:
    """Copy the workflow's tracked files into ``target``, as a fresh clone would have them."""
    target.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, target / name)
    return target


def run_snakemake(workdir: Path, *args: str, timeout: float = 1200, check: bool = True) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` and return the finished process, failing with its output on error."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    process = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=env,
    )
    if check and process.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({process.returncode}):\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}")
    return process


def data_overlay(cifar_root: Path) -> list[str]:
    return ["--config", f"data={{root: {cifar_root}}}"]


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, cifar_root) -> Path:
    """Run the smoke preset of the whole pipeline once on real CIFAR-10 and return its folder."""
    workdir = copy_workflow(tmp_path_factory.mktemp("smoke"))
    run_snakemake(workdir, "--cores", "2", "--configfile", "config.yaml", "presets/smoke.yaml", *data_overlay(cifar_root))
    return workdir


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory, cifar_root) -> Path:
    """Prepare a small, real subset of CIFAR-10 (30/10/10 images per class) and return cifar10.pt."""
    from cifar_study.data import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(cifar_root, out, split_seed=0, val_size=5000,
            subset={"train_per_class": 30, "val_per_class": 10, "test_per_class": 10}, download=False)
    return out / "cifar10.pt"


@pytest.fixture(scope="session")
def prepared_full(tmp_path_factory, cifar_root) -> Path:
    """Prepare all of CIFAR-10 (45,000/5,000/10,000) once and return cifar10.pt."""
    from cifar_study.data import prepare

    out = tmp_path_factory.mktemp("prepared_full")
    prepare(cifar_root, out, split_seed=0, val_size=5000, download=False)
    return out / "cifar10.pt"
