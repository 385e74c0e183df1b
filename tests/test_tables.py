"""Tables of the report: labels, number formats, LaTeX escaping and the columns of each table."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from synthetic_runs import write_run

from cifar_study import tables
from cifar_study.tables import format_value, latex_escape, latex_value, sweep_label

MLP = {"hidden_sizes": [32, 16], "activation": "relu", "dropout": 0.0, "lr": 1e-3, "seed": 42}
MIXER = {"patch_size": 8, "embed_dim": 16, "num_blocks": 1, "mlp_ratios": [0.5, 1.0], "dropout": 0.0,
         "activation": "gelu", "lr": 1e-3, "seed": 42}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1e-4, "1e-4"), (5e-5, "5e-5"), (1e-05, "1e-5"), (0.001, "1e-3"), (0.01, "0.01"), (0.1, "0.1"),
     (0, "0"), (0.0, "0"), (512, "512"), (2.5e-3, "2.5e-3"), ("tanh", "tanh"), (True, "true"),
     ([1024, 512], "[1024, 512]"), (None, "none")],
)
def test_format_value_as_written(value, expected):
    assert format_value(value) == expected


@pytest.mark.parametrize(
    ("settings", "keys", "expected"),
    [
        ({"lr": 1e-4}, ["lr"], "lr = 1e-4"),
        ({"patch_size": 8}, ["patch_size"], "patch 8"),
        ({"activation": "tanh"}, ["activation"], "tanh"),
        ({"weight_decay": 5e-5}, ["weight_decay"], "weight decay = 5e-5"),
        ({"weight_decay": 0}, ["weight_decay"], "weight decay = 0"),
        ({"num_blocks": 6}, ["num_blocks"], "blocks = 6"),
        ({"embed_dim": 512}, ["embed_dim"], "width = 512"),
        ({"dropout": 0.25}, ["dropout"], "dropout = 0.25"),
        ({"lr": 1e-3, "patch_size": 4}, ["lr", "patch_size"], "lr = 1e-3, patch 4"),
        ({"lr": 1e-3}, [], "default settings"),
    ],
)
def test_sweep_label_reads_like_prose(settings, keys, expected):
    assert sweep_label(settings, keys) == expected


def test_latex_escape_every_special_character():
    assert latex_escape(r"a_b 50% & #1 $x$ {y} ~ ^ \z") == (
        r"a\_b 50\% \& \#1 \$x\$ \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{}z"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1e-4, "$10^{-4}$"), (5e-5, r"$5\times10^{-5}$"), (0.01, "0.01"), (256, "256"), ("adam_w", r"adam\_w")],
)
def test_latex_value_uses_powers_of_ten(value, expected):
    assert latex_value(value) == expected


def test_breakable_id_escapes_and_allows_breaks():
    assert tables.breakable_id("mlp__lr=1e-05") == r"mlp\_\allowbreak{}\_\allowbreak{}lr=\allowbreak{}1e-05"


def make_runs(tmp_path, model, settings, key, values, accuracies, **kwargs):
    dirs = []
    for index, (value, accuracy) in enumerate(zip(values, accuracies)):
        run_id = f"{model}__{key}={value}"
        dirs.append(write_run(tmp_path / run_id, run_id, model, {**settings, key: value},
                              best_val_acc=accuracy, seed=index, **kwargs))
    return dirs


def test_weight_decay_table_columns(tmp_path):
    dirs = make_runs(tmp_path, "mlp", MLP, "weight_decay", [0, 5e-5], [0.5, 0.625], epochs=5)
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    tables.write_experiment_table("resnet18_weight_decay", dirs, ["weight_decay"], csv, tex)

    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["label", "run_id", "epochs_run", "best_epoch", "best_val_acc", "test_acc"]
    assert list(frame["label"]) == ["weight decay = 0", "weight decay = 5e-5"]
    assert list(frame["epochs_run"]) == [5, 5]
    assert frame["best_val_acc"].tolist() == pytest.approx([0.5, 0.625])
    text = tex.read_text()
    assert r"\begin{tabular}{@{}lrrrr@{}}" in text
    assert r"weight decay = 5e-5 & 5 & 5 & 62.5 & 61.5 \\" in text


def test_depth_table_matches_weight_decay_kind():
    assert tables.table_kind("mlpmixer_blocks") == tables.table_kind("resnet18_weight_decay") == "early_stopping"


def test_patch_table_has_cost_columns(tmp_path):
    dirs = make_runs(tmp_path, "mlpmixer", MIXER, "patch_size", [8, 16], [0.4, 0.3], seconds_per_epoch=2.25)
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    tables.write_experiment_table("mlpmixer_patch", dirs, ["patch_size"], csv, tex)

    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["label", "run_id", "num_params", "seconds_per_epoch", "best_val_acc"]
    counts = [json.loads((d / "run.json").read_text())["num_params"] for d in dirs]
    assert frame["num_params"].tolist() == counts
    assert frame["seconds_per_epoch"].tolist() == [2.25, 2.25]
    assert "patch 8 & " in tex.read_text()
    assert f"{int(frame['num_params'].iloc[0]):,}" in tex.read_text()


def test_width_table_gap_is_train_minus_val(tmp_path):
    dirs = make_runs(tmp_path, "mlpmixer", MIXER, "embed_dim", [16, 32], [0.4, 0.5])
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    tables.write_experiment_table("mlpmixer_width", dirs, ["embed_dim"], csv, tex)

    frame = pd.read_csv(csv)
    assert list(frame.columns) == [
        "label", "run_id", "final_train_acc", "final_val_acc", "generalisation_gap",
    ]
    history = pd.read_csv(dirs[0] / "history.csv")
    assert frame["final_train_acc"].iloc[0] == pytest.approx(history["train_acc"].iloc[-1])
    assert frame["final_val_acc"].iloc[0] == pytest.approx(history["val_acc"].iloc[-1])
    gap = frame["final_train_acc"] - frame["final_val_acc"]
    assert frame["generalisation_gap"].tolist() == pytest.approx(gap.tolist())
    assert "width = 16" in tex.read_text()


def test_generic_table_for_added_experiment(tmp_path):
    dirs = make_runs(tmp_path, "mlp", MLP, "hidden_sizes", [[8], [8, 8]], [0.4, 0.5])
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    tables.write_experiment_table("my_new_experiment", dirs, ["hidden_sizes"], csv, tex)

    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["label", "run_id", *tables.TABLE_KINDS["summary"]]
    text = tex.read_text()
    # The generic label names the key as written, with its underscore escaped.
    assert r"hidden\_sizes = [8, 8] & completed" in text


def test_diverged_run_shows_status_and_dashes(tmp_path):
    run_dir = write_run(tmp_path / "r", "mlp__lr=0.1", "mlp", {**MLP, "lr": 0.1}, best_val_acc=0.3, status="diverged")
    record = (run_dir / "run.json").read_text().replace('"test_acc": 0.', '"test_acc": NaN, "x": 0.')
    (run_dir / "run.json").write_text(record)
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    tables.write_experiment_table("resnet18_lr", [run_dir], ["lr"], csv, tex)

    assert r"lr = 0.1 & diverged & " in tex.read_text()
    assert "& -- &" in tex.read_text()
    assert math.isnan(pd.read_csv(csv)["test_acc"].iloc[0])


def test_seeds_join_labels_when_needed(tmp_path):
    dirs = [
        write_run(tmp_path / f"s{seed}", f"mlp__seed={seed}", "mlp", {**MLP, "seed": seed}, best_val_acc=0.4, seed=seed)
        for seed in (1, 2)
    ]
    frame = tables.summary_frame(dirs, ["lr"])
    assert list(frame["label"]) == ["lr = 1e-3, seed = 1", "lr = 1e-3, seed = 2"]

    single = tables.summary_frame(dirs[:1], ["lr"])
    assert list(single["label"]) == ["lr = 1e-3"]


def test_runs_table_lists_every_run(tmp_path):
    dirs = make_runs(tmp_path, "mlp", MLP, "activation", ["relu", "tanh"], [0.4, 0.5])
    run_dirs = {d.name: d for d in dirs}
    experiments = [
        ("first", "Title with _ and %", [dirs[0].name, dirs[1].name]),
        ("second", "Shared run", [dirs[1].name]),
    ]
    csv, tex = tmp_path / "all.csv", tmp_path / "all.tex"
    tables.write_runs_table(experiments, run_dirs, csv, tex)

    frame = pd.read_csv(csv)
    assert sorted(frame["run_id"]) == sorted(run_dirs)
    assert dict(zip(frame["run_id"], frame["experiments"])) == {
        dirs[0].name: "first", dirs[1].name: "first;second",
    }
    text = tex.read_text()
    assert r"\textit{Title with \_ and \%}" in text
    assert text.count(r"\texttt{mlp\_\allowbreak{}\_\allowbreak{}activation=\allowbreak{}tanh}") == 2


def test_missing_run_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json: run file not found"):
        tables.read_run(tmp_path / "absent")


def test_best_run_ranks_nan_last():
    records = [{"run_id": "a", "best_val_acc": float("nan")}, {"run_id": "b", "best_val_acc": 0.2},
               {"run_id": "c", "best_val_acc": None}]
    assert tables.best_run(records)["run_id"] == "b"


def test_cli_reports_error_in_one_line(tmp_path, capsys):
    status = tables.main(["experiment", "--experiment", "x", "--runs", str(tmp_path / "absent"),
                          "--csv", str(tmp_path / "t.csv"), "--tex", str(tmp_path / "t.tex"),
                          "--log", str(tmp_path / "t.log")])
    assert status == 1
    assert "run file not found" in capsys.readouterr().err
    assert "run file not found" in (tmp_path / "t.log").read_text()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("results/runs/mlp__lr=0.0001", "results/runs/mlp__lr=0.0001"),
     ("results/runs/mlp__lr=0.0001/run.json", "results/runs/mlp__lr=0.0001"),
     ("results/runs/mlp/model.pt", "results/runs/mlp")],
)
def test_run_folder_of_file_or_folder(path, expected):
    assert tables.run_folder(path).as_posix() == expected
