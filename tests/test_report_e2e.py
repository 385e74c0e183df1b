"""The report stage end to end, on the smoke preset's real runs of CIFAR-10."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml
from snakemake.utils import update_config

from conftest import data_overlay, run_snakemake

from cifar_study.config import build_study
from cifar_study.report import plan_report

SMOKE = ("--configfile", "config.yaml", "presets/smoke.yaml")


def smoke_config(workdir):
    """Return config.yaml with the smoke preset merged in, as Snakemake merges --configfile overlays."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    update_config(config, yaml.safe_load((workdir / "presets/smoke.yaml").read_text()))
    return config


def macro_values(text):
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", text, flags=re.MULTILINE))


def test_smoke_report_pdf(smoke_workdir):
    pdf = smoke_workdir / "results/report/report.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for heading in ("Set-up", "Activation function of the MLP", "Learning rate of ResNet18", "Patch size of MLP-Mixer",
                    "Weight decay of ResNet18", "Depth of MLP-Mixer", "Width of MLP-Mixer", "First-layer kernels",
                    "Token-mixing weights", "Gradient flow", "Every run"):
        assert heading in text
    assert "??" not in text


def test_smoke_every_figure_and_table(smoke_workdir):
    plan = plan_report(smoke_config(smoke_workdir))
    for path in plan.figures("pdf") + plan.figures("png") + plan.tables("tex") + plan.tables("csv"):
        assert (smoke_workdir / path).stat().st_size > 0, path


def test_smoke_numbers_match_runs(smoke_workdir):
    config = smoke_config(smoke_workdir)
    study = build_study(config)
    macros = macro_values((smoke_workdir / "results/report/numbers.tex").read_text())

    records = [json.loads((smoke_workdir / "results/runs" / run_id / "run.json").read_text())
               for run_id in study.experiments["mlp_activation"].run_ids]
    best = max(records, key=lambda record: record["best_val_acc"])
    assert macros["ActivationBest"] == best["settings"]["activation"]
    assert macros["ActivationBestValAcc"] == f"{100 * best['best_val_acc']:.1f}\\%"

    summary = json.loads((smoke_workdir / "results/data/cifar10.json").read_text())
    assert macros["TrainSize"] == f"{summary['num_train']:,}"
    assert macros["NumRuns"] == str(len(study.runs))


def test_smoke_report_stage_rebuilds_alone(smoke_workdir, cifar_root):
    for folder in ("results/figures", "results/tables", "results/report"):
        shutil.rmtree(smoke_workdir / folder)

    # Its time, under a minute on 2 cores, is measured in BENCHMARKS.md, not asserted here.
    process = run_snakemake(smoke_workdir, "--cores", "2", "results/report/report.pdf", *SMOKE,
                            *data_overlay(cifar_root))

    assert (smoke_workdir / "results/report/report.pdf").exists()
    stats = process.stdout + process.stderr
    assert not re.search(r"^train\s+\d+", stats, flags=re.MULTILINE), "the report stage retrained runs"


def test_smoke_one_figure_target(smoke_workdir, cifar_root):
    target = "results/figures/resnet18_lr_curves.png"
    (smoke_workdir / target).unlink()
    process = run_snakemake(smoke_workdir, "-n", target, *SMOKE, *data_overlay(cifar_root))
    assert re.findall(r"^rule (\w+):", process.stdout, flags=re.MULTILINE) == ["curves"]

    run_snakemake(smoke_workdir, "--cores", "1", target, *SMOKE, *data_overlay(cifar_root))
    assert (smoke_workdir / target).read_bytes().startswith(b"\x89PNG")


def test_smoke_html_report(smoke_workdir, cifar_root):
    run_snakemake(smoke_workdir, "--report", "report.html", *SMOKE, *data_overlay(cifar_root))
    html = (smoke_workdir / "report.html").read_text()
    assert "Learning curves of experiment" in html
    assert "first convolution" in html
