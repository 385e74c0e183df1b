"""Read run outputs and summarise them as tables, written as CSV and as LaTeX tabulars.

Every downstream stage reads runs through this module: ``read_run`` and
``read_history`` load the files of ``results/runs/<run-id>/``, ``sweep_label``
names a run by its swept values as a reader writes them (``lr = 1e-4``,
``patch 8``, ``tanh``), and ``best_run`` picks a run by validation accuracy.

CSV files keep raw values (accuracies as fractions in [0, 1]) for further
analysis. LaTeX fragments are bare ``tabular`` environments with percentages
and thousands separators, to be placed in a ``table`` by the report.

Run ``python -m cifar_study.tables --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

log = logging.getLogger(__name__)

# Label template of each sweep key, as a reader writes it in a legend or a
# table. Any other key reads ``key = value``.
SWEEP_LABELS = {
    "lr": "lr = {}",
    "weight_decay": "weight decay = {}",
    "patch_size": "patch {}",
    "num_blocks": "blocks = {}",
    "embed_dim": "width = {}",
    "activation": "{}",
}

STATUS_TEXT = {"completed": "completed", "early_stopped": "early stopped", "diverged": "diverged"}

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "$": r"\$",
    "&": r"\&",
    "#": r"\#",
    "%": r"\%",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
}


# ---------------------------------------------------------------------------
# Reading runs


# Files of a run folder that a command may be given in place of the folder.
RUN_FILES = ("run.json", "history.csv", "grad_norms.csv", "model.pt", "train.log")


def run_folder(path: str | Path) -> Path:
    """Return the run folder of ``path``, which names either the folder or a file in it such as run.json."""
    path = Path(path)
    # A suffix says nothing here: run ids such as mlp__lr=0.0001 end in one.
    return path.parent if path.name in RUN_FILES else path


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run.json`` of a run folder, with the folder added under ``run_dir``."""
    run_dir = run_folder(run_dir)
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: run file not found; train the run first (snakemake {path})") from None
    record["run_dir"] = str(run_dir)
    return record


def read_history(run_dir: str | Path) -> pd.DataFrame:
    """Read ``history.csv`` of a run folder, with 'nan' and 'inf' cells as non-finite floats."""
    return pd.read_csv(run_folder(run_dir) / "history.csv")


def accuracy_key(record: dict[str, Any]) -> float:
    """Return ``best_val_acc`` as a float, with a missing or non-finite value ranked last."""
    value = record.get("best_val_acc")
    if value is None or not math.isfinite(float(value)):
        return -math.inf
    return float(value)


def best_run(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the highest ``best_val_acc``, the first listed on a tie."""
    if not records:
        raise ValueError("no runs given; expected at least one run folder")
    return max(records, key=accuracy_key)


# ---------------------------------------------------------------------------
# Labels and number formats


def format_value(value: Any) -> str:
    """Write a setting value as a reader writes it: ``1e-4``, ``5e-5``, ``0.01``, ``512``, ``tanh``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e5:
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        if 1e-2 <= abs(value) < 1e5:
            return f"{value:g}"
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def sweep_label(settings: dict[str, Any], sweep_keys: Sequence[str]) -> str:
    """Name a run by its swept values, several keys joined by commas (``lr = 1e-3, patch 4``)."""
    parts = []
    for key in sweep_keys:
        template = SWEEP_LABELS.get(key, key + " = {}")
        parts.append(template.format(format_value(settings.get(key))))
    return ", ".join(parts) if parts else "default settings"


def latex_escape(text: Any) -> str:
    """Escape the characters that LaTeX treats specially (``_ % & # $ { } ~ ^ \\``)."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in str(text))


def latex_value(value: Any) -> str:
    """Write a setting value for LaTeX text: ``$10^{-4}$``, ``$5\\times10^{-5}$``, ``0.01``, ``tanh``."""
    text = format_value(value)
    if isinstance(value, float) and "e" in text:
        mantissa, exponent = text.split("e")
        power = f"10^{{{int(exponent)}}}"
        return f"${power}$" if mantissa == "1" else f"${mantissa}\\times{power}$"
    return latex_escape(text)


def percent(fraction: Any, digits: int = 1) -> str:
    """Write a fraction in [0, 1] as a percentage without the sign (``0.5432`` -> ``54.3``), or ``--`` if missing."""
    if fraction is None or not math.isfinite(float(fraction)):
        return "--"
    return f"{100 * float(fraction):.{digits}f}"


def thousands(count: Any) -> str:
    """Write an integer with comma thousands separators (``2,188,298``), or ``--`` if missing."""
    if count is None or (isinstance(count, float) and not math.isfinite(count)):
        return "--"
    return f"{int(count):,}"


def seconds(value: Any) -> str:
    """Write a duration in seconds with one decimal, or ``--`` if missing."""
    if value is None or not math.isfinite(float(value)):
        return "--"
    return f"{float(value):.1f}"


def integer(value: Any) -> str:
    """Write a count such as an epoch number, or ``--`` if missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "--"
    return str(int(value))


# ---------------------------------------------------------------------------
# Summaries


def _last(history: pd.DataFrame, column: str) -> float:
    """Return the last value of ``column``, or NaN when the history is empty."""
    if history.empty or column not in history:
        return math.nan
    return float(history[column].iloc[-1])


def run_summary(run_dir: str | Path, sweep_keys: Sequence[str]) -> dict[str, Any]:
    """Summarise one run as a table row: its label, seed, status, accuracies, cost and final accuracies."""
    record = read_run(run_dir)
    history = read_history(run_dir)
    settings = record.get("settings", {})

    final_train_acc = _last(history, "train_acc")
    final_val_acc = _last(history, "val_acc")
    return {
        "label": sweep_label(settings, sweep_keys),
        "run_id": record["run_id"],
        "seed": settings.get("seed"),
        "status": record.get("status"),
        "epochs_run": record.get("epochs_run"),
        "best_epoch": record.get("best_epoch"),
        "best_val_acc": record.get("best_val_acc"),
        "test_acc": record.get("test_acc"),
        "num_params": record.get("num_params"),
        "seconds_per_epoch": record.get("seconds_per_epoch"),
        "final_train_acc": final_train_acc,
        "final_val_acc": final_val_acc,
        # Percentage points of accuracy the model loses from training to validation data.
        "generalisation_gap": final_train_acc - final_val_acc,
    }


def summary_frame(
    run_dirs: Sequence[str | Path], sweep_keys: Sequence[str], with_seed: bool | None = None
) -> pd.DataFrame:
    """Summarise runs as a frame, one row per run in the given order.

    With ``with_seed=None`` the seed joins the labels when two runs would
    otherwise share a label (an experiment with several seeds).
    """
    rows = [run_summary(run_dir, sweep_keys) for run_dir in run_dirs]
    labels = [row["label"] for row in rows]
    if with_seed is None:
        with_seed = len(set(labels)) < len(labels)
    if with_seed and "seed" not in sweep_keys:
        for row in rows:
            row["label"] += f", seed = {row['seed']}"
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Column:
    """A table column: its key in the summary, its LaTeX header and how a value is written."""

    key: str
    header: str
    fmt: Callable[[Any], str]
    align: str = "r"


def stacked(*lines: str) -> str:
    """Return a table header set on several lines, to keep numeric columns narrow."""
    return r"\begin{tabular}[b]{@{}c@{}}" + r" \\ ".join(lines) + r"\end{tabular}"


COLUMNS = {
    column.key: column
    for column in (
        Column("status", "status", lambda s: STATUS_TEXT.get(s, latex_escape(s)), "l"),
        Column("epochs_run", stacked("epochs", "run"), integer),
        Column("best_epoch", stacked("best", "epoch"), integer),
        Column("best_val_acc", stacked("val acc", r"(\%)"), percent),
        Column("test_acc", stacked("test acc", r"(\%)"), percent),
        Column("num_params", "parameters", thousands),
        Column("seconds_per_epoch", stacked("seconds", "per epoch"), seconds),
        Column("final_train_acc", stacked("final train", r"acc (\%)"), percent),
        Column("final_val_acc", stacked("final val", r"acc (\%)"), percent),
        Column("generalisation_gap", stacked("gap", "(points)"), percent),
    )
}

# Columns of each kind of table, after the run label.
TABLE_KINDS = {
    "summary": ("status", "epochs_run", "best_epoch", "best_val_acc", "test_acc", "num_params", "seconds_per_epoch"),
    "early_stopping": ("epochs_run", "best_epoch", "best_val_acc", "test_acc"),
    "cost": ("num_params", "seconds_per_epoch", "best_val_acc"),
    "generalisation": ("final_train_acc", "final_val_acc", "generalisation_gap"),
}

# Table kind of each question of the study. Any other experiment gets "summary".
EXPERIMENT_TABLES = {
    "resnet18_weight_decay": "early_stopping",
    "mlpmixer_blocks": "early_stopping",
    "mlpmixer_patch": "cost",
    "mlpmixer_width": "generalisation",
}


def table_kind(experiment_id: str) -> str:
    """Return the kind of table of an experiment: one of TABLE_KINDS."""
    return EXPERIMENT_TABLES.get(experiment_id, "summary")


def latex_tabular(frame: pd.DataFrame, columns: Sequence[str], first_header: str = "run") -> str:
    """Write the label column and ``columns`` of ``frame`` as a booktabs ``tabular``."""
    specs = [COLUMNS[key] for key in columns]
    lines = [
        "% Generated by cifar_study.tables; edit the pipeline, not this file.",
        r"\begin{tabular}{@{}l" + "".join(spec.align for spec in specs) + "@{}}",
        r"\toprule",
        " & ".join([latex_escape(first_header)] + [spec.header for spec in specs]) + r" \\",
        r"\midrule",
    ]
    for row in frame.to_dict("records"):
        cells = [latex_escape(row["label"])] + [spec.fmt(_none_if_nan(row[spec.key])) for spec in specs]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_experiment_table(
    experiment_id: str,
    run_dirs: Sequence[str | Path],
    sweep_keys: Sequence[str],
    csv_path: str | Path,
    tex_path: str | Path,
    with_seed: bool | None = None,
    kind: str | None = None,
) -> pd.DataFrame:
    """Write the table of one experiment as CSV and LaTeX, of ``kind`` or else the experiment's kind (see table_kind)."""
    kind = kind or table_kind(experiment_id)
    if kind not in TABLE_KINDS:
        raise ValueError(f"table kind {kind!r} is unknown; use one of {', '.join(TABLE_KINDS)}")
    frame = summary_frame(run_dirs, sweep_keys, with_seed)
    columns = TABLE_KINDS[kind]

    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    frame[["label", "run_id", *columns]].to_csv(csv_path, index=False, float_format="%.6g")
    Path(tex_path).write_text(latex_tabular(frame, columns))
    log.info("%s: wrote %s table of %d runs to %s and %s", experiment_id, kind, len(frame), csv_path, tex_path)
    return frame


def breakable_id(identifier: str) -> str:
    """Escape a run or experiment id for \\texttt and allow line breaks after each ``_`` and ``=``."""
    return latex_escape(identifier).replace(r"\_", r"\_\allowbreak{}").replace("=", r"=\allowbreak{}")


def write_runs_table(
    experiments: Sequence[tuple[str, str, Sequence[str]]],
    run_dirs: dict[str, str | Path],
    csv_path: str | Path,
    tex_path: str | Path,
) -> pd.DataFrame:
    """Write every run of the study as CSV (one row per run) and as a LaTeX ``longtable`` grouped by experiment.

    ``experiments`` lists (experiment id, title, run ids) in report order and
    ``run_dirs`` maps each run id to its folder. A run shared by two
    experiments is listed under each of them in the LaTeX table.
    """
    summaries = {run_id: run_summary(run_dir, ()) for run_id, run_dir in run_dirs.items()}
    experiments_of = {run_id: [] for run_id in run_dirs}
    for experiment_id, _, run_ids in experiments:
        for run_id in run_ids:
            experiments_of[run_id].append(experiment_id)

    rows = []
    for run_id, summary in summaries.items():
        row = {"run_id": run_id, "experiments": ";".join(experiments_of[run_id])}
        row.update({key: summary[key] for key in TABLE_KINDS["summary"]})
        rows.append(row)
    frame = pd.DataFrame(rows)
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv_path, index=False, float_format="%.6g")

    columns = ("status", "epochs_run", "best_epoch", "best_val_acc", "test_acc", "num_params", "seconds_per_epoch")
    specs = [COLUMNS[key] for key in columns]
    width = len(specs) + 1
    lines = [
        "% Generated by cifar_study.tables; edit the pipeline, not this file.",
        r"\begin{longtable}{@{}>{\raggedright\arraybackslash}p{0.3\linewidth}" + "".join(s.align for s in specs) + "@{}}",
        r"\toprule",
        " & ".join(["run"] + [s.header for s in specs]) + r" \\",
        r"\midrule",
        r"\endhead",
        r"\bottomrule",
        r"\endlastfoot",
    ]
    for index, (experiment_id, title, run_ids) in enumerate(experiments):
        if index:
            lines.append(r"\addlinespace")
        lines.append(rf"\multicolumn{{{width}}}{{l}}{{\textit{{{latex_escape(title)}}} (\texttt{{{latex_escape(experiment_id)}}})}} \\")
        for run_id in run_ids:
            summary = summaries[run_id]
            cells = [r"\texttt{" + breakable_id(run_id) + "}"]
            cells += [spec.fmt(_none_if_nan(summary[spec.key])) for spec in specs]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\end{longtable}", ""]
    Path(tex_path).write_text("\n".join(lines))
    log.info("wrote the table of %d runs to %s and %s", len(frame), csv_path, tex_path)
    return frame


# ---------------------------------------------------------------------------
# Command line


def setup_cli_logging(log_path: str | None) -> None:
    """Log to ``log_path`` (or stderr without one), one line per event."""
    handler: logging.Handler = logging.FileHandler(log_path, mode="w") if log_path else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the subcommand's handler and turn an error into one line on stderr and exit status 1."""
    args = parser.parse_args(argv)
    setup_cli_logging(args.log)
    try:
        args.handler(args)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        log.exception("failed: %s", error)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _experiment_command(args: argparse.Namespace) -> None:
    write_experiment_table(
        args.experiment, args.runs, args.sweep_keys, args.csv, args.tex, with_seed=args.with_seed, kind=args.kind
    )


def _runs_command(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.experiments).read_text()) if args.experiments.endswith(".json") else json.loads(args.experiments)
    experiments = [(e["id"], e["title"], e["run_ids"]) for e in spec]
    run_dirs = {run_folder(path).name: run_folder(path) for path in args.runs}
    write_runs_table(experiments, run_dirs, args.csv, args.tex)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_study.tables", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    experiment = commands.add_parser("experiment", help="table of one experiment")
    experiment.add_argument("--experiment", required=True, help="experiment id, which selects the kind of table")
    experiment.add_argument("--kind", choices=sorted(TABLE_KINDS), help="override the kind of table")
    experiment.add_argument("--sweep-keys", nargs="*", default=[], help="settings the experiment sweeps")
    experiment.add_argument(
        "--with-seed", action="store_true", default=None,
        help="add the seed to each run's label (default: only when two runs would share a label)",
    )
    experiment.add_argument("--runs", nargs="+", required=True, help="run folders or their run.json, in table order")
    experiment.set_defaults(handler=_experiment_command)

    runs = commands.add_parser("runs", help="table of every run, grouped by experiment")
    runs.add_argument(
        "--experiments", required=True, help="JSON list of {id, title, run_ids} in report order, or a .json file with it"
    )
    runs.add_argument("--runs", nargs="+", required=True, help="run folders (named by run id) or their run.json")
    runs.set_defaults(handler=_runs_command)

    for command in (experiment, runs):
        command.add_argument("--csv", required=True, help="CSV file to write")
        command.add_argument("--tex", required=True, help="LaTeX tabular fragment to write")
        command.add_argument("--log", help="log file (default: stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
