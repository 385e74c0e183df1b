"""The report on synthetic runs: plan, macros, generated fragments, the LaTeX build and the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from synthetic_runs import REPO, small_config, write_study_runs

from cifar_study import figures, report, tables
from cifar_study.config import ConfigError, build_study

# Names in the prose that contain digits but are not numbers.
NAMES_WITH_DIGITS = ("ResNet18", "CIFAR-10", "L2")


def macro_values(text: str) -> dict[str, str]:
    """Return {name: value} of the one-line \\newcommand definitions in ``text``."""
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", text, flags=re.MULTILINE))


def write_data_summary(workdir: Path, sizes=(200, 100, 100)) -> Path:
    path = workdir / "results/data/cifar10.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(zip(("num_train", "num_val", "num_test"), sizes))))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A workflow folder with synthetic runs for every run of the small configuration."""
    workdir = tmp_path_factory.mktemp("study")
    config = small_config()
    write_data_summary(workdir)
    write_study_runs(config, workdir / "results/runs")
    return workdir, config


def build_everything(workdir: Path, config: dict) -> report.ReportPlan:
    """Write every figure, table and fragment the report includes, as the rules would, into ``workdir``."""
    plan = report.plan_report(config)
    runs_dir = workdir / "results/runs"

    def run_dirs(experiment_id):
        return [runs_dir / run_id for run_id in plan.study.experiments[experiment_id].run_ids]

    def out(path):
        return workdir / path

    for experiment_id in (*plan.questions, *plan.extra_experiments):
        experiment = plan.study.experiments[experiment_id]
        figures.plot_learning_curves(run_dirs(experiment_id), experiment.sweep_keys, experiment.title,
                                     out(plan.curves(experiment_id, "pdf")), out(plan.curves(experiment_id, "png")))
        tables.write_experiment_table(experiment_id, run_dirs(experiment_id), experiment.sweep_keys,
                                      out(plan.table(experiment_id, "csv")), out(plan.table(experiment_id, "tex")))
    figures.plot_conv1_kernels(run_dirs(plan.kernels_experiment), out(plan.kernels_figure("pdf")),
                               out(plan.kernels_figure("png")))
    figures.plot_token_mixing(run_dirs(plan.token_mixing_experiment),
                              [out(p) for p in plan.token_mixing_figures("pdf")],
                              [out(p) for p in plan.token_mixing_figures("png")])
    for model, experiment_id in plan.gradient_flow.items():
        figures.plot_gradient_flow(run_dirs(experiment_id), model, out(plan.gradient_flow_figure(model, "pdf")),
                                   out(plan.gradient_flow_figure(model, "png")), experiment_id)
    experiments = [(e.experiment_id, e.title, e.run_ids) for e in plan.study.experiments.values()]
    tables.write_runs_table(experiments, {run_id: runs_dir / run_id for run_id in plan.study.runs},
                            out(plan.runs_table("csv")), out(plan.runs_table("tex")))
    report.write_numbers(config, runs_dir, out(plan.fragment("numbers")), workdir / "results/data/cifar10.json")
    report.write_fragments(config, {name: out(plan.fragment(name)) for name in report.FRAGMENTS})
    return plan


@pytest.fixture(scope="module")
def built(study):
    """The study folder with the report compiled from its synthetic runs."""
    workdir, config = study
    plan = build_everything(workdir, config)
    pdf = report.build_pdf(REPO / "report", workdir / "results/report")
    return workdir, config, plan, pdf


# ---------------------------------------------------------------------------
# Plan


def test_plan_lists_questions_and_extras():
    plan = report.plan_report(small_config())
    assert plan.questions == tuple(report.QUESTIONS)
    assert plan.extra_experiments == ("extra_dropout",)
    assert plan.kernels_experiment == "resnet18_weight_decay"
    assert plan.token_mixing_experiment == "mlpmixer_blocks"
    assert plan.gradient_flow == {"mlp": "mlp_activation", "resnet18": "resnet18_lr", "mlpmixer": "mlpmixer_patch"}


def test_plan_pages_of_64_token_units():
    config = small_config()
    # embed_dim 32 and token-mixing ratio 4.0: 128 hidden units.
    assert report.plan_report(config).token_mixing_figures("pdf") == [
        "results/figures/token_mixing_p1.pdf", "results/figures/token_mixing_p2.pdf",
    ]
    config["models"]["mlpmixer"]["mlp_ratios"] = [0.5, 4.0]
    assert report.plan_report(config).token_mixing_pages == 1


def test_plan_of_full_config():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    plan = report.plan_report(config)
    # The depth study's Mixer: embed_dim 256 and ratio 0.5 give 128 token-mixing units.
    assert plan.token_mixing_pages == 2
    assert plan.extra_experiments == ()
    assert "results/figures/gradient_flow_mlpmixer.pdf" in plan.figures("pdf")


@pytest.mark.parametrize(
    ("report_section", "message"),
    [
        ({"kernels_experiment": "nope"}, "report.kernels_experiment: experiment 'nope' is not declared"),
        ({"kernels_experiment": "mlp_activation"}, "trains mlp, but the figure needs a resnet18 experiment"),
        ({"token_mixing_experiment": "resnet18_lr"}, "trains resnet18, but the figure needs a mlpmixer experiment"),
        ({"kernel_experiment": "resnet18_lr"}, "report: unknown key 'kernel_experiment'"),
    ],
)
def test_plan_rejects_invalid_report_keys(report_section, message):
    config = {**small_config(), "report": report_section}
    with pytest.raises(ConfigError, match=re.escape(message)):
        report.plan_report(config)


def test_plan_null_leaves_figure_out():
    config = {**small_config(), "report": {"kernels_experiment": None, "token_mixing_experiment": None}}
    plan = report.plan_report(config)
    assert "results/figures/conv1_kernels.pdf" not in plan.figures("pdf")
    assert not plan.token_mixing_figures("pdf") or plan.token_mixing_experiment is None
    assert "sections/kernels.tex" not in plan.sections()
    assert "sections/token_mixing.tex" not in plan.sections()


def test_plan_drops_sections_of_missing_questions():
    config = small_config()
    del config["experiments"]["mlpmixer_width"]
    plan = report.plan_report(config)
    assert "mlpmixer_width" not in plan.questions
    assert "sections/mlpmixer_width.tex" not in plan.sections()
    assert "results/figures/mlpmixer_width_curves.pdf" not in plan.report_inputs()


def test_token_units_match_model():
    from cifar_study.models import build_model

    settings = {"patch_size": 8, "embed_dim": 24, "num_blocks": 1, "mlp_ratios": [0.75, 1.0]}
    model = build_model("mlpmixer", **settings)
    assert report.token_mixing_units(settings) == model.blocks[0].token_mixing.fc1.out_features


# ---------------------------------------------------------------------------
# Numbers


def test_numbers_define_question_flags(built):
    workdir, *_ = built
    text = (workdir / "results/report/numbers.tex").read_text()
    for flag in (*report.QUESTIONS, "kernels", "token_mixing", "gradient_flow"):
        assert rf"\csname cifarstudy@question@{flag}\endcsname" in text


def test_numbers_best_values_from_runs(study):
    workdir, config = study
    macros = macro_values(report.numbers_tex(config, workdir / "results/runs"))
    study_ = build_study(config)

    def best(experiment_id, key):
        records = [json.loads((workdir / "results/runs" / run_id / "run.json").read_text())
                   for run_id in study_.experiments[experiment_id].run_ids]
        return max(records, key=lambda r: r["best_val_acc"])["settings"][key], max(r["best_val_acc"] for r in records)

    activation, accuracy = best("mlp_activation", "activation")
    assert macros["ActivationBest"] == activation
    assert macros["ActivationBestValAcc"] == f"{100 * accuracy:.1f}\\%"
    weight_decay, _ = best("resnet18_weight_decay", "weight_decay")
    assert macros["WeightDecayBest"] == tables.latex_value(weight_decay)
    blocks, _ = best("mlpmixer_blocks", "num_blocks")
    assert macros["BlocksBest"] == str(blocks)
    assert macros["LrDiverged"] == "0.1"
    assert macros["LrDivergedCount"] == "1"
    assert macros["WeightDecayLearningRate"] == "$10^{-4}$"
    assert macros["NumRuns"] == str(len(study_.runs))


def test_numbers_split_sizes_from_data_summary(study):
    workdir, config = study
    macros = macro_values(report.numbers_tex(config, workdir / "results/runs", workdir / "results/data/cifar10.json"))
    assert (macros["TrainSize"], macros["ValSize"], macros["TestSize"]) == ("200", "100", "100")

    # Without the summary: the published sizes of CIFAR-10 and the config.
    macros = macro_values(report.numbers_tex(config, workdir / "results/runs"))
    assert (macros["TrainSize"], macros["ValSize"], macros["TestSize"]) == ("45,000", "5,000", "10,000")


def test_numbers_compute_time_sums_history(study):
    workdir, config = study
    total = 0.0
    for run_id in build_study(config).runs:
        history = tables.read_history(workdir / "results/runs" / run_id)
        total += history["train_seconds"].sum() + history["eval_seconds"].sum()
    macros = macro_values(report.numbers_tex(config, workdir / "results/runs"))
    assert macros["ComputeTime"] == report.duration_text(total)


@pytest.mark.parametrize(("seconds", "text"), [(59, "59 seconds"), (600, "10.0 minutes"), (3 * 3600, "3.0 hours")])
def test_duration_text_units(seconds, text):
    assert report.duration_text(seconds) == text


def test_newcommand_rejects_digits():
    with pytest.raises(ValueError, match="letters only"):
        report.newcommand("Resnet18Best", "x")


def test_prose_uses_only_defined_macros(built):
    workdir, *_ = built
    defined = set(macro_values((workdir / "results/report/numbers.tex").read_text()))
    defined |= {"ReportQuestion", "IfFileExists"}
    sources = [REPO / "report/report.tex", *sorted((REPO / "report/sections").glob("*.tex"))]
    sources += [workdir / "results/report" / f"{name}.tex" for name in report.FRAGMENTS]
    for source in sources:
        used = set(re.findall(r"\\([A-Z][A-Za-z]*)", source.read_text()))
        assert used <= defined, f"{source.name} uses undefined macros {sorted(used - defined)}"


def test_prose_types_no_number():
    for source in [REPO / "report/report.tex", *sorted((REPO / "report/sections").glob("*.tex"))]:
        text = source.read_text()
        text = re.sub(r"(?<!\\)%.*", "", text)
        text = re.sub(r"\\(label|ref|input|includegraphics|usepackage|documentclass)(\[[^\]]*\])?\{[^}]*\}", "", text)
        text = re.sub(r"\\(setlength|texttt|ReportQuestion)\{[^}]*\}(\{[^}]*\})?", "", text)
        text = re.sub(r"#\d", "", text)
        text = re.sub(r"\[[^\]]*\]", "", text)
        for name in NAMES_WITH_DIGITS:
            text = text.replace(name, "")
        assert not re.findall(r".{0,30}\d.{0,30}", text), f"{source.name} types a number"


# ---------------------------------------------------------------------------
# Fragments


def test_setup_lists_defaults_and_experiments(study):
    _, config = study
    plan = report.plan_report(config)
    text = report.setup_tex(config, plan)
    assert r"\section{Set-up}" in text
    for key in config["defaults"]:
        assert rf"\texttt{{{tables.latex_escape(key)}}} &" in text
    assert r"\texttt{lr} & $10^{-3}$ \\" in text
    for experiment_id in plan.study.experiments:
        assert rf"\texttt{{{tables.breakable_id(experiment_id)}}} &" in text
    for macro in (r"\TrainSize", r"\ValSize", r"\TestSize", r"\Devices", r"\Precisions", r"\ComputeTime"):
        assert macro in text


def test_experiments_fragment_lists_extra_experiment(study):
    _, config = study
    text = report.experiments_tex(report.plan_report(config))
    title = r"Dropout \& width\_1 at 50\% \{test\} \$x\$ \#1 \textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert rf"\subsection{{{title}}}" in text
    assert r"\includegraphics[width=\linewidth]{../figures/extra_dropout_curves.pdf}" in text
    assert r"\input{../tables/extra_dropout.tex}" in text
    assert "mlp_activation" not in text


def test_experiments_fragment_empty_without_extras():
    config = small_config()
    del config["experiments"]["extra_dropout"]
    text = report.experiments_tex(report.plan_report(config))
    assert r"\section" not in text


def test_token_mixing_fragment_one_figure_per_page(study):
    _, config = study
    text = report.token_mixing_figures_tex(report.plan_report(config))
    assert text.count(r"\begin{figure}") == 2
    assert "../figures/token_mixing_p2.pdf" in text


def test_gradient_flow_captions_name_run(study):
    _, config = study
    text = report.gradient_flow_figures_tex(report.plan_report(config))
    assert text.count(r"\begin{figure}") == 3
    for prefix in ("GradientFlowMlp", "GradientFlowResNet", "GradientFlowMixer"):
        assert rf"\{prefix}Run" in text
        assert rf"\{prefix}Experiment" in text
    assert "separate panels" in text


# ---------------------------------------------------------------------------
# LaTeX build


def test_report_builds_pdf(built):
    workdir, _, _, pdf = built
    assert pdf.read_bytes().startswith(b"%PDF")
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for heading in ("Set-up", "Activation function of the MLP", "Learning rate of ResNet18", "Patch size of MLP-Mixer",
                    "Weight decay of ResNet18", "Depth of MLP-Mixer", "First-layer kernels", "Token-mixing weights",
                    "Gradient flow", "Every run", "Further experiments"):
        assert heading in text
    # Without lmodern (Computer Modern, OT1) pdftotext reads an underscore as a space.
    assert re.search(r"Dropout & width[_ ]1 at 50% \{test\} \$x\$ #1", text)
    assert "??" not in text


def test_report_inputs_cover_every_file_read(built):
    workdir, _, plan, _ = built
    report_dir = workdir / "results/report"
    read = set()
    for line in (report_dir / "report.fls").read_text().splitlines():
        if not line.startswith("INPUT "):
            continue
        path = (report_dir / line.removeprefix("INPUT ")).resolve()
        if workdir.resolve() in path.parents and path.suffix in (".tex", ".pdf"):
            read.add(path.relative_to(workdir.resolve()).as_posix())

    declared = set(plan.report_inputs("report"))
    # The build reads its copies of report/ inside results/report/.
    read = {re.sub(r"^results/report/(report\.tex|sections/)", r"report/\1", path) for path in read}
    assert read <= declared, f"read but not declared: {sorted(read - declared)}"
    assert declared - read == set(), f"declared but not read: {sorted(declared - read)}"


def test_missing_file_fails_fast(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "report.tex").write_text("\\documentclass{article}\\begin{document}\\input{absent_part}\\end{document}\n")
    start = time.monotonic()
    with pytest.raises(report.LatexError, match="absent_part"):
        report.build_pdf(source, tmp_path / "build")
    assert time.monotonic() - start < 30


def test_latex_error_quotes_log(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "report.tex").write_text("\\documentclass{article}\\begin{document}\\NoSuchMacro\\end{document}\n")
    with pytest.raises(report.LatexError, match=r"Undefined control sequence.*NoSuchMacro"):
        report.build_pdf(source, tmp_path / "build")


def test_no_latex_names_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(report.LatexError) as error:
        report.latex_commands("report.tex")
    assert "apt-get install latexmk texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended" in str(
        error.value)


def test_no_latexmk_runs_engine_directly(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "latexmk" else f"/usr/bin/{name}")
    commands = report.latex_commands("report.tex")
    assert [command[0] for command in commands] == ["/usr/bin/pdflatex"] * 3
    assert "-halt-on-error" in commands[0]


def test_lualatex_when_pdflatex_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "pdflatex" else f"/usr/bin/{name}")
    [command] = report.latex_commands("report.tex")
    assert command[:3] == ["/usr/bin/latexmk", "-norc", "-pdflua"]


def test_build_cli_without_latex_on_path(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "report.tex").write_text("\\documentclass{article}\\begin{document}x\\end{document}\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    process = subprocess.run(
        [sys.executable, "-m", "cifar_study.report", "build", "--source", str(source), "--workdir", str(tmp_path / "b")],
        env={"PATH": str(empty), "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60,
    )
    assert process.returncode == 1
    assert "texlive-latex-extra" in process.stderr


# ---------------------------------------------------------------------------
# Rules


def rule_blocks(path: Path) -> dict[str, str]:
    """Return {rule name: its text} of a rule file."""
    text = path.read_text()
    starts = list(re.finditer(r"^\s*rule (\w+):", text, flags=re.MULTILINE))
    return {m.group(1): text[m.end() : (starts[i + 1].start() if i + 1 < len(starts) else len(text))]
            for i, m in enumerate(starts)}


@pytest.mark.parametrize("name", ["figures.smk", "report.smk"])
def test_every_rule_logs_and_is_local(name):
    blocks = rule_blocks(REPO / "workflow/rules" / name)
    assert blocks
    for rule, body in blocks.items():
        assert "log:" in body, f"rule {rule} has no log"
        assert "localrule: True" in body, f"rule {rule} is not a local rule"


@pytest.fixture(scope="module")
def workflow_with_runs(tmp_path_factory):
    """A copy of the workflow with synthetic runs of the small configuration, newer than the data."""
    from conftest import copy_workflow

    workdir = copy_workflow(tmp_path_factory.mktemp("flow"))
    config = small_config()
    (workdir / "small.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_data_summary(workdir)
    (workdir / "results/data/cifar10.pt").write_bytes(b"")
    time.sleep(0.05)
    write_study_runs(config, workdir / "results/runs")
    return workdir, config


def dry_run(workdir: Path, *targets: str, field: str = "input") -> dict[str, list[list[str]]]:
    """Return {rule: [``field`` of each job, split at commas]} of a dry run of ``targets`` with the small config."""
    from conftest import run_snakemake

    process = run_snakemake(workdir, "-n", *targets, "--configfile", "config.yaml", "small.yaml",
                            "--config", "data={root: /nonexistent}")
    jobs: dict[str, list[list[str]]] = {}
    for match in re.finditer(r"^rule (\w+):\n((?:    .*\n)*)", process.stdout, flags=re.MULTILINE):
        value = re.search(rf"^    {field}: (.*)$", match.group(2), flags=re.MULTILINE)
        jobs.setdefault(match.group(1), []).append(value.group(1).split(", ") if value else [])
    return jobs


def run_files(config, experiment_id, *names):
    return sorted(f"results/runs/{run_id}/{name}"
                  for run_id in build_study(config).experiments[experiment_id].run_ids for name in names)


@pytest.mark.parametrize(
    ("target", "rule", "experiment", "names"),
    [
        ("results/figures/resnet18_lr_curves.pdf", "curves", "resnet18_lr", ("run.json", "history.csv")),
        ("results/figures/conv1_kernels.png", "conv1_kernels", "resnet18_weight_decay", ("run.json", "model.pt")),
        ("results/figures/token_mixing_p2.pdf", "token_mixing", "mlpmixer_blocks", ("run.json", "model.pt")),
        ("results/figures/gradient_flow_mlpmixer.pdf", "gradient_flow", "mlpmixer_patch",
         ("run.json", "grad_norms.csv")),
        ("results/tables/mlpmixer_width.tex", "experiment_table", "mlpmixer_width", ("run.json", "history.csv")),
    ],
)
def test_one_target_schedules_one_rule(workflow_with_runs, target, rule, experiment, names):
    workdir, config = workflow_with_runs
    jobs = dry_run(workdir, target)
    assert list(jobs) == [rule]
    [inputs] = jobs[rule]
    code = [path for path in inputs if path.endswith(".py")]
    assert sorted(Path(path).name for path in code) == ["figures.py", "report.py", "tables.py"]
    assert sorted(path for path in inputs if path not in code) == run_files(config, experiment, *names)


def test_report_target_schedules_report_stage_only(workflow_with_runs):
    workdir, config = workflow_with_runs
    jobs = dry_run(workdir, "results/report/report.pdf")
    assert "train" not in jobs
    report_inputs = [path for path in jobs["report"][0] if not path.endswith(".py")]
    assert sorted(report_inputs) == sorted(report.plan_report(config).report_inputs("report"))
    assert len(jobs["curves"]) == len(build_study(config).experiments)


def test_one_figure_trains_only_its_runs(tmp_path):
    from conftest import copy_workflow

    workdir = copy_workflow(tmp_path / "flow")
    config = small_config()
    (workdir / "small.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = dry_run(workdir, "results/figures/mlp_activation_curves.pdf", field="wildcards")

    assert sorted(jobs) == ["curves", "prepare_data", "train"]
    trained = sorted(wildcards[0].removeprefix("run_id=") for wildcards in jobs["train"])
    assert trained == sorted(build_study(config).experiments["mlp_activation"].run_ids)
