"""The LaTeX report of the study: what it contains, the numbers its prose quotes, and the PDF build.

- ``plan_report`` decides from the configuration which questions the report
  answers, which runs each study-specific figure reads and which files the
  document includes. The Snakefile calls it at every invocation, so this
  module imports only the standard library and ``cifar_study.config`` at load
  time.
- ``write_numbers`` writes ``numbers.tex``: one LaTeX macro per number or
  result the prose quotes, computed from the run files, so that no number in
  the report is typed by hand.
- ``write_fragments`` writes the parts of the document that follow the
  configuration: the set-up section, the appendix of experiments beyond the
  six built-in questions, and the lists of token-mixing and gradient-flow
  figures.
- ``build_pdf`` copies ``report/`` next to the generated fragments and runs
  latexmk without a terminal, so a LaTeX error stops the build at once.

Run ``python -m cifar_study.report --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cifar_study.config import IMAGE_SIZE, ConfigError, Study, build_study
from cifar_study.config import load_config as load_config_files

log = logging.getLogger(__name__)

FIGURES_DIR = "results/figures"
TABLES_DIR = "results/tables"
REPORT_DIR = "results/report"

# The study's six questions, in report order, and the prefix of their macros in numbers.tex.
QUESTIONS = {
    "mlp_activation": "Activation",
    "resnet18_lr": "Lr",
    "mlpmixer_patch": "Patch",
    "resnet18_weight_decay": "WeightDecay",
    "mlpmixer_blocks": "Blocks",
    "mlpmixer_width": "Width",
}
MODEL_NAMES = {"mlp": "MLP", "resnet18": "ResNet18", "mlpmixer": "MLP-Mixer"}
MODEL_MACROS = {"mlp": "Mlp", "resnet18": "ResNet", "mlpmixer": "Mixer"}

# Experiments whose best run the weight figures show; `report:` in config.yaml overrides them.
REPORT_DEFAULTS = {"kernels_experiment": "resnet18_weight_decay", "token_mixing_experiment": "mlpmixer_blocks"}
UNITS_PER_PAGE = 64

# CIFAR-10 as published: 50,000 training and 10,000 test images in 10 classes.
CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000
CIFAR10_CLASSES = 10

DEBIAN_LATEX_PACKAGES = "latexmk texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended"
# latexmk options for each engine, in order of preference.
LATEX_ENGINES = (("pdflatex", "-pdf"), ("lualatex", "-pdflua"), ("xelatex", "-pdfxe"))
LATEX_OPTIONS = ("-interaction=nonstopmode", "-halt-on-error", "-file-line-error")


# ---------------------------------------------------------------------------
# Plan: what the report contains


@dataclass(frozen=True)
class ReportPlan:
    """The report's contents for one configuration, and the files they come from.

    Paths are relative to the working directory of the workflow.
    """

    study: Study
    questions: tuple[str, ...]
    extra_experiments: tuple[str, ...]
    kernels_experiment: str | None
    token_mixing_experiment: str | None
    token_mixing_pages: int
    gradient_flow: dict[str, str]

    @staticmethod
    def curves(experiment_id: str, ext: str = "pdf") -> str:
        return f"{FIGURES_DIR}/{experiment_id}_curves.{ext}"

    @staticmethod
    def table(experiment_id: str, ext: str = "tex") -> str:
        return f"{TABLES_DIR}/{experiment_id}.{ext}"

    @staticmethod
    def runs_table(ext: str = "tex") -> str:
        return f"{TABLES_DIR}/all_runs.{ext}"

    @staticmethod
    def kernels_figure(ext: str = "pdf") -> str:
        return f"{FIGURES_DIR}/conv1_kernels.{ext}"

    def token_mixing_figures(self, ext: str = "pdf") -> list[str]:
        return [f"{FIGURES_DIR}/token_mixing_p{page}.{ext}" for page in range(1, self.token_mixing_pages + 1)]

    @staticmethod
    def gradient_flow_figure(model: str, ext: str = "pdf") -> str:
        return f"{FIGURES_DIR}/gradient_flow_{model}.{ext}"

    @staticmethod
    def fragment(name: str) -> str:
        """Return the path of a generated LaTeX file in the report folder (numbers, setup, ...)."""
        return f"{REPORT_DIR}/{name}.tex"

    def figures(self, ext: str = "pdf") -> list[str]:
        """Return every figure the report includes."""
        paths = [self.curves(e, ext) for e in (*self.questions, *self.extra_experiments)]
        if self.kernels_experiment:
            paths.append(self.kernels_figure(ext))
        paths += self.token_mixing_figures(ext) if self.token_mixing_experiment else []
        paths += [self.gradient_flow_figure(model, ext) for model in self.gradient_flow]
        return paths

    def tables(self, ext: str = "tex") -> list[str]:
        """Return every table the report includes."""
        return [self.table(e, ext) for e in (*self.questions, *self.extra_experiments)] + [self.runs_table(ext)]

    def sections(self) -> list[str]:
        """Return the hand-written sections the report inputs, as paths inside report/."""
        names = list(self.questions)
        if self.kernels_experiment:
            names.append("kernels")
        if self.token_mixing_experiment:
            names.append("token_mixing")
        if self.gradient_flow:
            names.append("gradient_flow")
        return ["report.tex"] + [f"sections/{name}.tex" for name in names]

    def report_inputs(self, source_dir: str = "report") -> list[str]:
        """Return every file the document reads: sources, generated fragments, figures and tables."""
        sources = [f"{source_dir}/{path}" for path in self.sections()]
        fragments = [self.fragment(name) for name in FRAGMENTS] + [self.fragment("numbers")]
        return sources + fragments + self.figures("pdf") + self.tables("tex")


# Generated fragments that depend on the configuration only (see write_fragments).
FRAGMENTS = ("setup", "experiments", "token_mixing_figures", "gradient_flow_figures")


def report_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Return the `report:` section of ``config`` with defaults for missing keys."""
    section = config.get("report") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"report: expected a mapping such as {REPORT_DEFAULTS}, got {section!r}")
    unknown = sorted(set(section) - set(REPORT_DEFAULTS))
    if unknown:
        raise ConfigError(f"report: unknown key {unknown[0]!r}; valid keys are {', '.join(REPORT_DEFAULTS)}")
    return {**REPORT_DEFAULTS, **section}


def _chosen_experiment(study: Study, key: str, experiment_id: Any, model: str) -> str | None:
    """Return the experiment named by report.<key> after checking that it is declared and trains ``model``.

    None (null in the config) leaves the figure out.
    """
    if experiment_id is None:
        return None
    if experiment_id not in study.experiments:
        raise ConfigError(
            f"report.{key}: experiment {experiment_id!r} is not declared under 'experiments'; "
            f"name one of {', '.join(study.experiments)} or set it to null to leave the figure out"
        )
    actual = study.experiments[experiment_id].model
    if actual != model:
        raise ConfigError(f"report.{key}: experiment {experiment_id!r} trains {actual}, but the figure needs a {model} experiment")
    return experiment_id


def token_mixing_units(settings: dict[str, Any]) -> int:
    """Return the hidden width of a Mixer run's token-mixing MLP: ``int(mlp_ratios[0] * embed_dim)``.

    This is the rule of ``cifar_study.models.mixer.hidden_widths``, repeated
    here so that planning the report does not import torch.
    """
    return int(settings["mlp_ratios"][0] * settings["embed_dim"])


def plan_report(config: dict[str, Any], study: Study | None = None) -> ReportPlan:
    """Decide the report's contents for ``config``, raising ConfigError on an invalid `report:` section."""
    study = study or build_study(config)
    settings = report_settings(config)
    kernels = _chosen_experiment(study, "kernels_experiment", settings["kernels_experiment"], "resnet18")
    token_mixing = _chosen_experiment(study, "token_mixing_experiment", settings["token_mixing_experiment"], "mlpmixer")

    pages = 0
    if token_mixing:
        # Runs of one experiment may differ in width: plan pages for the widest.
        units = max(token_mixing_units(run.settings) for run in study.runs_of(token_mixing))
        pages = math.ceil(units / UNITS_PER_PAGE)

    # Gradient flow of each model: the best run of the model's first experiment.
    gradient_flow = {}
    for model in MODEL_NAMES:
        experiments = study.experiments_of_model(model)
        if experiments:
            gradient_flow[model] = experiments[0].experiment_id

    return ReportPlan(
        study=study,
        questions=tuple(e for e in QUESTIONS if e in study.experiments),
        extra_experiments=tuple(e for e in study.experiments if e not in QUESTIONS),
        kernels_experiment=kernels,
        token_mixing_experiment=token_mixing,
        token_mixing_pages=pages,
        gradient_flow=gradient_flow,
    )


# ---------------------------------------------------------------------------
# Numbers: macros computed from the run files


def newcommand(name: str, value: Any) -> str:
    """Return ``\\newcommand{\\name}{value}``, checking that the name has letters only, as LaTeX requires."""
    if not re.fullmatch(r"[A-Za-z]+", name):
        raise ValueError(f"invalid LaTeX macro name {name!r}; use letters only")
    return f"\\newcommand{{\\{name}}}{{{value}}}"


def percent_text(fraction: Any) -> str:
    """Write a fraction as ``54.3\\%``, or ``n/a`` if missing."""
    from cifar_study.tables import percent

    text = percent(fraction)
    return "n/a" if text == "--" else text + r"\%"


def duration_text(total_seconds: float) -> str:
    """Write a duration in the largest unit that keeps it readable: seconds, minutes or hours."""
    if total_seconds < 120:
        return f"{total_seconds:.0f} seconds"
    if total_seconds < 2 * 3600:
        return f"{total_seconds / 60:.1f} minutes"
    return f"{total_seconds / 3600:.1f} hours"


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class SweepPoint:
    """The runs of one sweep point of an experiment (one per seed), with mean metrics."""

    value: str
    label: str
    records: list[dict[str, Any]]
    summaries: list[dict[str, Any]]

    def mean(self, key: str) -> float:
        return _mean([summary[key] for summary in self.summaries])

    @property
    def diverged(self) -> bool:
        return any(record.get("status") == "diverged" for record in self.records)

    @property
    def early_stopped(self) -> bool:
        return any(record.get("status") == "early_stopped" for record in self.records)


def sweep_points(study: Study, experiment_id: str, runs_dir: str | Path) -> list[SweepPoint]:
    """Group an experiment's runs by sweep point in config order, so that runs differing only in seed share a point."""
    from cifar_study.tables import format_value, latex_escape, latex_value, read_run, run_summary, sweep_label

    experiment = study.experiments[experiment_id]
    points: dict[tuple, SweepPoint] = {}
    for run in study.runs_of(experiment_id):
        key = tuple(format_value(run.settings.get(k)) for k in experiment.sweep_keys)
        if key not in points:
            label = sweep_label(run.settings, experiment.sweep_keys)
            if len(experiment.sweep_keys) == 1:
                value = latex_value(run.settings.get(experiment.sweep_keys[0]))
            else:
                value = latex_escape(label)
            points[key] = SweepPoint(value=value, label=label, records=[], summaries=[])
        run_dir = Path(runs_dir) / run.run_id
        points[key].records.append(read_run(run_dir))
        points[key].summaries.append(run_summary(run_dir, experiment.sweep_keys))
    return list(points.values())


def _extreme(points: list[SweepPoint], key: str, highest: bool) -> SweepPoint | None:
    """Return the point with the highest (or lowest) finite mean of ``key``, the first on a tie."""
    ranked = [point for point in points if math.isfinite(point.mean(key))]
    if not ranked:
        return None
    pick = max if highest else min
    return pick(ranked, key=lambda point: point.mean(key))


def _shared_setting(study: Study, experiment_id: str, key: str) -> str:
    """Write the value of ``key`` shared by an experiment's runs, or its values joined by commas."""
    from cifar_study.tables import latex_value

    values = []
    for run in study.runs_of(experiment_id):
        text = "none" if run.settings.get(key) is None else latex_value(run.settings.get(key))
        if text not in values:
            values.append(text)
    return ", ".join(values)


def question_macros(study: Study, experiment_id: str, prefix: str, runs_dir: str | Path) -> list[str]:
    """Return the macros of one question: its best and worst sweep points, extremes of cost and generalisation."""
    from cifar_study.tables import thousands

    points = sweep_points(study, experiment_id, runs_dir)
    missing = "n/a"

    def value(point: SweepPoint | None) -> str:
        return point.value if point else missing

    best = _extreme(points, "best_val_acc", highest=True)
    worst = _extreme(points, "best_val_acc", highest=False)
    fastest = _extreme(points, "seconds_per_epoch", highest=False)
    slowest = _extreme(points, "seconds_per_epoch", highest=True)
    fewest = _extreme(points, "num_params", highest=False)
    most = _extreme(points, "num_params", highest=True)
    largest_gap = _extreme(points, "generalisation_gap", highest=True)
    smallest_gap = _extreme(points, "generalisation_gap", highest=False)
    diverged = [point.value for point in points if point.diverged]

    def epochs(point: SweepPoint | None, key: str) -> str:
        return f"{point.mean(key):.0f}" if point and math.isfinite(point.mean(key)) else missing

    def gap(point: SweepPoint | None) -> str:
        # A negative gap (validation above training accuracy) gets a proper minus sign.
        return f"{100 * point.mean('generalisation_gap'):.1f}".replace("-", "$-$") if point else missing

    def duration(point: SweepPoint | None) -> str:
        return f"{point.mean('seconds_per_epoch'):.1f}" if point else missing

    def count(point: SweepPoint | None) -> str:
        return thousands(point.mean("num_params")) if point else missing

    macros = {
        "Runs": str(sum(len(point.records) for point in points)),
        "Points": str(len(points)),
        "Best": value(best),
        "BestValAcc": percent_text(best.mean("best_val_acc")) if best else missing,
        "BestTestAcc": percent_text(best.mean("test_acc")) if best else missing,
        "BestEpoch": epochs(best, "best_epoch"),
        "BestEpochsRun": epochs(best, "epochs_run"),
        "Worst": value(worst),
        "WorstValAcc": percent_text(worst.mean("best_val_acc")) if worst else missing,
        "WorstTestAcc": percent_text(worst.mean("test_acc")) if worst else missing,
        "DivergedCount": str(len(diverged)),
        "Diverged": ", ".join(diverged) if diverged else "none",
        "EarlyStoppedCount": str(sum(point.early_stopped for point in points)),
        "Fastest": value(fastest),
        "FastestSeconds": duration(fastest),
        "Slowest": value(slowest),
        "SlowestSeconds": duration(slowest),
        "FewestParams": value(fewest),
        "FewestParamsCount": count(fewest),
        "MostParams": value(most),
        "MostParamsCount": count(most),
        "LargestGap": value(largest_gap),
        "LargestGapPoints": gap(largest_gap),
        "SmallestGap": value(smallest_gap),
        "SmallestGapPoints": gap(smallest_gap),
        # Settings the experiment fixes, for the prose that states its set-up.
        "Epochs": _shared_setting(study, experiment_id, "epochs"),
        "Patience": _shared_setting(study, experiment_id, "early_stopping_patience"),
        "LearningRate": _shared_setting(study, experiment_id, "lr"),
        "Optimizer": _shared_setting(study, experiment_id, "optimizer"),
    }
    return [f"% {experiment_id}"] + [newcommand(prefix + name, text) for name, text in macros.items()]


def _best_run_macros(study: Study, experiment_id: str, prefix: str, runs_dir: str | Path) -> tuple[list[str], dict]:
    """Return the macros naming the best run of an experiment (the one a weight or gradient figure shows)."""
    from cifar_study.tables import best_run, breakable_id, latex_escape, read_run, sweep_label

    experiment = study.experiments[experiment_id]
    record = best_run([read_run(Path(runs_dir) / run_id) for run_id in experiment.run_ids])
    label = sweep_label(record.get("settings", {}), experiment.sweep_keys)
    lines = [
        newcommand(prefix + "Experiment", latex_escape(experiment_id)),
        newcommand(prefix + "Run", latex_escape(label)),
        newcommand(prefix + "RunId", r"\texttt{" + breakable_id(record["run_id"]) + "}"),
        newcommand(prefix + "ValAcc", percent_text(record.get("best_val_acc"))),
        newcommand(prefix + "TestAcc", percent_text(record.get("test_acc"))),
    ]
    return lines, record


def split_sizes(config: dict[str, Any], data_summary: str | Path | None = None) -> tuple[int, int, int]:
    """Return the (train, validation, test) image counts of the prepared data.

    They come from ``data_summary`` (the cifar10.json that data preparation
    writes) when given, else from the published sizes of CIFAR-10 and the
    `data:` section of ``config``.
    """
    if data_summary:
        summary = json.loads(Path(data_summary).read_text())
        return int(summary["num_train"]), int(summary["num_val"]), int(summary["num_test"])
    data = config.get("data") or {}
    val_size = int(data.get("val_size", 5000))
    subset = data.get("subset") or {}
    train = CIFAR10_TRAIN_IMAGES - val_size
    val = val_size
    test = CIFAR10_TEST_IMAGES
    if subset.get("train_per_class"):
        train = min(train, CIFAR10_CLASSES * int(subset["train_per_class"]))
    if subset.get("val_per_class"):
        val = min(val, CIFAR10_CLASSES * int(subset["val_per_class"]))
    if subset.get("test_per_class"):
        test = min(test, CIFAR10_CLASSES * int(subset["test_per_class"]))
    return train, val, test


def _distinct(values: Sequence[Any]) -> str:
    from cifar_study.tables import latex_escape

    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return latex_escape(", ".join(str(value) for value in seen)) if seen else "n/a"


def numbers_tex(
    config: dict[str, Any], runs_dir: str | Path, data_summary: str | Path | None = None, plan: ReportPlan | None = None
) -> str:
    """Return the text of numbers.tex: every number and result the report's prose quotes, as macros.

    ``data_summary`` is the cifar10.json of data preparation, the source of the split sizes.
    """
    from cifar_study.tables import latex_value, read_history, read_run, thousands

    plan = plan or plan_report(config)
    study = plan.study
    records = [read_run(Path(runs_dir) / run_id) for run_id in study.runs]
    statuses = [record.get("status") for record in records]

    # Compute time: every epoch's training and evaluation, over all distinct runs.
    total_seconds = 0.0
    for run_id in study.runs:
        history = read_history(Path(runs_dir) / run_id)
        for column in ("train_seconds", "eval_seconds"):
            if column in history:
                total_seconds += float(history[column].fillna(0).sum())

    defaults = config.get("defaults") or {}
    train, val, test = split_sizes(config, data_summary)
    lines = [
        "% Generated by cifar_study.report from the run files; edit the pipeline, not this file.",
        "% Questions this configuration answers; report.tex inputs a section only when its flag is set.",
    ]
    flags = list(plan.questions)
    flags += ["kernels"] if plan.kernels_experiment else []
    flags += ["token_mixing"] if plan.token_mixing_experiment else []
    flags += ["gradient_flow"] if plan.gradient_flow else []
    lines += [rf"\expandafter\def\csname cifarstudy@question@{flag}\endcsname{{}}" for flag in flags]

    lines += [
        "% The study",
        newcommand("NumExperiments", len(study.experiments)),
        newcommand("NumRuns", len(study.runs)),
        newcommand("NumCompleted", statuses.count("completed")),
        newcommand("NumEarlyStopped", statuses.count("early_stopped")),
        newcommand("NumDiverged", statuses.count("diverged")),
        newcommand("TrainSize", thousands(train)),
        newcommand("ValSize", thousands(val)),
        newcommand("TestSize", thousands(test)),
        newcommand("SplitSeed", (config.get("data") or {}).get("split_seed", "n/a")),
        newcommand("ComputeTime", duration_text(total_seconds)),
        newcommand("Devices", _distinct([record.get("device") for record in records])),
        newcommand("Precisions", _distinct([record.get("precision") for record in records])),
        newcommand("PythonVersions", _distinct([record.get("versions", {}).get("python") for record in records])),
        newcommand("TorchVersions", _distinct([record.get("versions", {}).get("torch") for record in records])),
        newcommand(
            "TorchvisionVersions", _distinct([record.get("versions", {}).get("torchvision") for record in records])
        ),
        newcommand("DefaultEpochs", latex_value(defaults.get("epochs"))),
        newcommand("DefaultBatchSize", latex_value(defaults.get("batch_size"))),
        newcommand("DefaultLearningRate", latex_value(defaults.get("lr"))),
        newcommand("DefaultWeightDecay", latex_value(defaults.get("weight_decay"))),
        newcommand("DefaultOptimizer", latex_value(defaults.get("optimizer"))),
        newcommand("DefaultSeed", latex_value(defaults.get("seed"))),
    ]

    for experiment_id in plan.questions:
        lines += question_macros(study, experiment_id, QUESTIONS[experiment_id], runs_dir)

    if plan.kernels_experiment:
        macros, record = _best_run_macros(study, plan.kernels_experiment, "Kernels", runs_dir)
        lines += ["% conv1 kernels", *macros, newcommand("KernelsCount", record["settings"]["widths"][0])]

    if plan.token_mixing_experiment:
        macros, record = _best_run_macros(study, plan.token_mixing_experiment, "TokenMixing", runs_dir)
        patch_size = record["settings"]["patch_size"]
        side = IMAGE_SIZE // patch_size
        units = token_mixing_units(record["settings"])
        lines += [
            "% Token-mixing weights",
            *macros,
            newcommand("TokenMixingUnits", units),
            newcommand("TokenMixingPatchSize", patch_size),
            newcommand("TokenMixingGrid", rf"${side}\times{side}$"),
            newcommand("TokenMixingPatches", side * side),
            newcommand("TokenMixingPages", math.ceil(units / UNITS_PER_PAGE)),
            newcommand("TokenMixingUnitsPerPage", UNITS_PER_PAGE),
        ]

    for model, experiment_id in plan.gradient_flow.items():
        macros, _ = _best_run_macros(study, experiment_id, "GradientFlow" + MODEL_MACROS[model], runs_dir)
        lines += [f"% Gradient flow of {model}", *macros]
    return "\n".join(lines) + "\n"


def write_numbers(
    config: dict[str, Any], runs_dir: str | Path, output: str | Path, data_summary: str | Path | None = None
) -> None:
    """Write numbers.tex (see numbers_tex)."""
    text = numbers_tex(config, runs_dir, data_summary)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    log.info("wrote %d macros to %s", text.count(r"\newcommand"), output)


# ---------------------------------------------------------------------------
# Fragments that follow the configuration


def _settings_text(settings: dict[str, Any]) -> str:
    from cifar_study.tables import latex_escape, latex_value

    if not settings:
        return "--"
    return ", ".join(rf"\texttt{{{latex_escape(key)}}} = {latex_value(value)}" for key, value in settings.items())


def _sweep_text(study: Study, experiment_id: str) -> str:
    """Write an experiment's sweep as ``key: v1, v2, ...`` per key, values in config order."""
    from cifar_study.tables import latex_escape, latex_value

    experiment = study.experiments[experiment_id]
    parts = []
    for key in experiment.sweep_keys:
        values = []
        for run in study.runs_of(experiment_id):
            text = latex_value(run.settings.get(key))
            if text not in values:
                values.append(text)
        parts.append(rf"\texttt{{{latex_escape(key)}}}: " + ", ".join(values))
    if experiment.seeds:
        parts.append(r"\texttt{seed}: " + ", ".join(str(seed) for seed in experiment.seeds))
    return "; ".join(parts) if parts else "--"


def setup_tex(config: dict[str, Any], plan: ReportPlan) -> str:
    """Return the set-up section: data, training defaults, model defaults, experiments and hardware."""
    from cifar_study.tables import breakable_id, latex_escape, latex_value

    study = plan.study
    defaults = config.get("defaults") or {}
    augment = defaults.get("augment")
    lines = [
        "% Generated by cifar_study.report from the configuration; edit config.yaml, not this file.",
        r"\section{Set-up}\label{sec:setup}",
        "",
        r"\paragraph{Data.} The runs train on CIFAR-10, split into \TrainSize{} training and \ValSize{} "
        r"validation images (the same split, drawn with seed \SplitSeed{}, for every run), and are tested on "
        r"\TestSize{} test images. Model selection and early stopping use the validation images only; each run "
        r"evaluates the test images once, with the weights of its best validation epoch.",
        (
            r"By default the training images are augmented with a random horizontal flip and a random resized crop "
            r"back to the full image size, and every image is normalised with the per-channel mean and standard "
            r"deviation of CIFAR-10."
            if augment
            else r"By default the training images are not augmented; every image is normalised with the per-channel "
            r"mean and standard deviation of CIFAR-10."
        ),
        "",
        r"\paragraph{Training.} Every run starts from the defaults in Table~\ref{tab:defaults}. Each experiment "
        r"overrides some of them and sweeps others (Table~\ref{tab:experiments}); a run is one point of a sweep.",
        "",
        r"\begin{table}[htbp]",
        r"\centering\small",
        r"\caption{Default settings of every run, and the default arguments of each model.}",
        r"\label{tab:defaults}",
        r"\begin{tabular}{ll}",
        r"\toprule",
        r"setting & default \\",
        r"\midrule",
    ]
    lines += [rf"\texttt{{{latex_escape(key)}}} & {latex_value(value)} \\" for key, value in defaults.items()]
    for model, args in (config.get("models") or {}).items():
        lines += [r"\midrule", rf"\multicolumn{{2}}{{l}}{{\textit{{{latex_escape(MODEL_NAMES.get(model, model))}}}}} \\"]
        lines += [rf"\texttt{{{latex_escape(key)}}} & {latex_value(value)} \\" for key, value in (args or {}).items()]
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
        r"\begin{table}[htbp]",
        r"\centering\small",
        r"\caption{Experiments: the settings each overrides and the values it sweeps.}",
        r"\label{tab:experiments}",
        r"\setlength{\tabcolsep}{4pt}",
        r"\begin{tabular}{@{}>{\raggedright\arraybackslash}p{0.25\linewidth}l>{\raggedright\arraybackslash}"
        r"p{0.3\linewidth}>{\raggedright\arraybackslash}p{0.22\linewidth}r@{}}",
        r"\toprule",
        r"experiment & model & overrides & sweep & runs \\",
        r"\midrule",
    ]
    for experiment_id, experiment in study.experiments.items():
        lines.append(
            rf"\texttt{{{breakable_id(experiment_id)}}} & {MODEL_NAMES.get(experiment.model, latex_escape(experiment.model))} & "
            rf"{_settings_text(experiment.overrides)} & {_sweep_text(study, experiment_id)} & {len(experiment.run_ids)} \\"
        )
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
        r"\paragraph{Hardware and software.} The runs trained on \Devices{} with \Precisions{} precision, under "
        r"Python \PythonVersions{}, PyTorch \TorchVersions{} and torchvision \TorchvisionVersions{}. Training and "
        r"evaluation took \ComputeTime{} in all, summed over every epoch of the \NumRuns{} distinct runs; "
        r"\NumCompleted{} ran all their epochs, \NumEarlyStopped{} stopped early and \NumDiverged{} diverged.",
        "",
    ]
    return "\n".join(lines)


def experiments_tex(plan: ReportPlan) -> str:
    """Return the appendix of experiments beyond the six questions: description, learning curves and table each."""
    from cifar_study.tables import latex_escape

    study = plan.study
    header = "% Generated by cifar_study.report from the configuration; edit config.yaml, not this file."
    if not plan.extra_experiments:
        return header + "\n% The configuration declares no experiment beyond the six questions of the study.\n"

    lines = [
        header,
        r"\section{Further experiments}\label{app:further}",
        "",
        r"These experiments are declared in the configuration in addition to the six questions of the study.",
    ]
    for experiment_id in plan.extra_experiments:
        experiment = study.experiments[experiment_id]
        title = latex_escape(experiment.title)
        name = rf"\texttt{{{latex_escape(experiment_id)}}}"
        lines += [
            "",
            rf"\subsection{{{title}}}\label{{app:{experiment_id}}}",
            "",
            rf"Experiment {name} trains {MODEL_NAMES.get(experiment.model, latex_escape(experiment.model))} with "
            rf"overrides {_settings_text(experiment.overrides)} and sweeps {_sweep_text(study, experiment_id)}.",
            "",
            r"\begin{figure}[htbp]",
            r"\centering",
            rf"\includegraphics[width=\linewidth]{{../figures/{experiment_id}_curves.pdf}}",
            rf"\caption{{Learning curves of experiment {name}: {title}.}}",
            rf"\label{{fig:{experiment_id}-curves}}",
            r"\end{figure}",
            "",
            r"\begin{table}[htbp]",
            r"\centering\footnotesize",
            rf"\caption{{Runs of experiment {name}: {title}.}}",
            rf"\label{{tab:{experiment_id}}}",
            rf"\input{{../tables/{experiment_id}.tex}}",
            r"\end{table}",
        ]
    return "\n".join(lines) + "\n"


def token_mixing_figures_tex(plan: ReportPlan) -> str:
    """Return one figure per page of token-mixing weights; the first carries the full caption."""
    lines = ["% Generated by cifar_study.report from the configuration; edit config.yaml, not this file."]
    for page, path in enumerate(plan.token_mixing_figures("pdf"), start=1):
        if page == 1:
            caption = (
                r"First-layer weights of the token-mixing MLP in block 1 of the best MLP-Mixer of "
                r"\texttt{\TokenMixingExperiment} (\TokenMixingRun, best validation accuracy \TokenMixingValAcc): "
                r"one image per hidden unit, showing its weights on the \TokenMixingGrid{} grid of patches, "
                r"\TokenMixingUnitsPerPage{} units per page. Each unit is scaled by its largest absolute weight, so "
                r"red is positive and blue negative on that unit's own scale."
            )
        else:
            caption = rf"Token-mixing weights of \TokenMixingRun, continued (page {page} of \TokenMixingPages)."
        lines += [
            r"\begin{figure}[htbp]",
            r"\centering",
            rf"\includegraphics[width=0.8\linewidth]{{../{path.removeprefix('results/')}}}",
            rf"\caption{{{caption}}}",
            rf"\label{{fig:token-mixing-{page}}}",
            r"\end{figure}",
        ]
    return "\n".join(lines) + "\n"


def gradient_flow_figures_tex(plan: ReportPlan) -> str:
    """Return one gradient-flow figure per model, each caption naming the run it shows."""
    lines = ["% Generated by cifar_study.report from the configuration; edit config.yaml, not this file."]
    for model in plan.gradient_flow:
        macro = "GradientFlow" + MODEL_MACROS[model]
        panels = (
            " Token-mixing and channel-mixing layers are in separate panels." if model == "mlpmixer" else ""
        )
        lines += [
            r"\begin{figure}[htbp]",
            r"\centering",
            rf"\includegraphics[width=\linewidth,height=0.8\textheight,keepaspectratio]"
            rf"{{../{plan.gradient_flow_figure(model).removeprefix('results/')}}}",
            rf"\caption{{Gradient flow of {MODEL_NAMES[model]}: the mean L2 norm of each parameter's gradient per "
            rf"epoch, parameters from the input (top) to the output (bottom), in the best run by validation "
            rf"accuracy of \texttt{{\{macro}Experiment}}, {{\{macro}Run}}.{panels} Grey cells mark norms that "
            r"are not finite or zero.}",
            rf"\label{{fig:gradient-flow-{model}}}",
            r"\end{figure}",
        ]
    return "\n".join(lines) + "\n"


def write_fragments(config: dict[str, Any], outputs: dict[str, str | Path]) -> None:
    """Write the generated fragments named in ``outputs`` (keys: the names in FRAGMENTS)."""
    unknown = sorted(set(outputs) - set(FRAGMENTS))
    if unknown:
        raise ValueError(f"unknown fragment {unknown[0]!r}; valid fragments are {', '.join(FRAGMENTS)}")
    plan = plan_report(config)
    writers = {
        "setup": lambda: setup_tex(config, plan),
        "experiments": lambda: experiments_tex(plan),
        "token_mixing_figures": lambda: token_mixing_figures_tex(plan),
        "gradient_flow_figures": lambda: gradient_flow_figures_tex(plan),
    }
    for name, path in outputs.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(writers[name]())
        log.info("wrote %s", path)


# ---------------------------------------------------------------------------
# PDF build


class LatexError(RuntimeError):
    """Error of a missing or failed LaTeX, whose message names the fix or the first errors of the log."""


def latex_commands(main: str) -> list[list[str]]:
    """Return the commands that compile ``main``: latexmk with the first engine found, else the engine three times.

    Raises LatexError naming the Debian packages when no engine is installed.
    """
    engines = [(shutil.which(engine), option) for engine, option in LATEX_ENGINES if shutil.which(engine)]
    if not engines:
        raise LatexError(
            "no LaTeX engine found (pdflatex, lualatex or xelatex); figures and tables are built, but the PDF "
            f"needs LaTeX: on Debian or Ubuntu run `apt-get install {DEBIAN_LATEX_PACKAGES}`"
        )
    engine, option = engines[0]
    latexmk = shutil.which("latexmk")
    if latexmk:
        # -norc, because a user's latexmkrc could turn on preview or continuous mode, which waits forever.
        return [[latexmk, "-norc", option, *LATEX_OPTIONS, main]]
    log.warning("latexmk not found; running %s three times instead (install latexmk to rerun only when needed)",
                Path(engine).name)
    # Three passes settle the cross-references and longtable's column widths.
    return [[engine, *LATEX_OPTIONS, main]] * 3


def latex_errors(log_text: str, limit: int = 3) -> list[str]:
    """Return the first error lines of a LaTeX log: ``file:line: message`` or ``! message``, with the line quoted."""
    errors = []
    lines = log_text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^(\S.*?):(\d+): ", line) or line.startswith("! "):
            context = next((lines[j].strip() for j in range(index + 1, min(index + 8, len(lines))) if lines[j].startswith("l.")), "")
            errors.append(f"{line.strip()} {context}".strip())
            if len(errors) == limit:
                break
    return errors


def copy_sources(source_dir: str | Path, workdir: str | Path) -> list[Path]:
    """Copy the .tex files of ``source_dir`` (with sub-folders) into ``workdir`` and return the copies."""
    source_dir, workdir = Path(source_dir), Path(workdir)
    copies = []
    for source in sorted(source_dir.rglob("*.tex")):
        target = workdir / source.relative_to(source_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copies.append(target)
    return copies


def build_pdf(source_dir: str | Path, workdir: str | Path, main: str = "report.tex", timeout: float = 300) -> Path:
    """Compile ``source_dir``/``main`` in ``workdir`` and return the PDF.

    LaTeX runs with stdin closed, in nonstop mode and halting at the first
    error, so a missing file or a LaTeX error raises LatexError at once, with
    the error lines of the log, instead of waiting for input.
    """
    workdir = Path(workdir)
    if not (Path(source_dir) / main).is_file():
        raise FileNotFoundError(f"{Path(source_dir) / main}: report source not found")
    copy_sources(source_dir, workdir)
    for command in latex_commands(main):
        log.info("running %s in %s", " ".join(command), workdir)
        try:
            result = subprocess.run(
                command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise LatexError(f"{command[0]} timed out after {timeout:.0f} s on {workdir / main}") from None
        log.info("%s output:\n%s", Path(command[0]).name, result.stdout)
        if result.returncode != 0:
            log_path = workdir / Path(main).with_suffix(".log")
            log_text = log_path.read_text(errors="replace") if log_path.exists() else result.stdout
            errors = latex_errors(log_text) or result.stdout.strip().splitlines()[-3:]
            raise LatexError(f"LaTeX failed on {workdir / main}: " + " | ".join(errors) + f" (full log: {log_path})")
    pdf = workdir / Path(main).with_suffix(".pdf")
    log.info("wrote %s", pdf)
    return pdf


# ---------------------------------------------------------------------------
# Command line


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """Return the configuration given as ``--config-json`` or as ``--configfile`` YAML files merged in order."""
    if args.config_json:
        return json.loads(args.config_json)
    return load_config_files(*args.configfile)


def _numbers_command(args: argparse.Namespace) -> None:
    from cifar_study.tables import run_folder

    runs_dir = args.runs_dir
    if args.runs:
        # The runs of a study share one parent folder, results/runs by default.
        parents = {run_folder(path).parent for path in args.runs}
        if len(parents) != 1:
            raise ValueError(f"--runs lie in {len(parents)} folders ({', '.join(map(str, sorted(parents)))}); expected one")
        runs_dir = parents.pop()
    write_numbers(load_config(args), runs_dir, args.output, args.data_summary)


def _fragments_command(args: argparse.Namespace) -> None:
    outputs = {name: getattr(args, name) for name in FRAGMENTS if getattr(args, name)}
    write_fragments(load_config(args), outputs)


def _build_command(args: argparse.Namespace) -> None:
    build_pdf(args.source, args.workdir, args.main, args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_study.report", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    numbers = commands.add_parser("numbers", help="write numbers.tex, the macros the prose quotes")
    numbers.add_argument("--runs-dir", default="results/runs", help="folder of the run folders")
    numbers.add_argument("--runs", nargs="*", help="run.json files of the runs, in place of --runs-dir")
    numbers.add_argument("--data-summary", help="cifar10.json of data preparation, for the split sizes")
    numbers.add_argument("--output", required=True, help="numbers.tex to write")
    numbers.set_defaults(handler=_numbers_command)

    fragments = commands.add_parser("fragments", help="write the fragments that follow the configuration")
    for name in FRAGMENTS:
        fragments.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{name}.tex to write")
    fragments.set_defaults(handler=_fragments_command)

    for command in (numbers, fragments):
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--config-json", help="the resolved configuration as JSON")
        source.add_argument("--configfile", nargs="+", help="YAML configuration files, later ones overriding earlier")

    build = commands.add_parser("build", help="compile the report with latexmk")
    build.add_argument("--source", default="report", help="folder of report.tex and its sections")
    build.add_argument("--workdir", default=REPORT_DIR, help="folder to compile in, next to the generated fragments")
    build.add_argument("--main", default="report.tex", help="main LaTeX file inside --source")
    build.add_argument("--timeout", type=float, default=300, help="seconds before one LaTeX command is stopped")
    build.set_defaults(handler=_build_command)

    for command in (numbers, fragments, build):
        command.add_argument("--log", help="log file (default: stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cifar_study.tables import run_cli

    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
