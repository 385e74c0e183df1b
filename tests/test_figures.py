"""Figures of the report on synthetic runs: learning curves, weight images and gradient flow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from synthetic_runs import write_run

from cifar_study import figures

MLP = {"hidden_sizes": [32, 16], "activation": "relu", "dropout": 0.0, "lr": 1e-3, "seed": 42}
RESNET = {"widths": [64, 8, 8, 8], "blocks": [1, 1, 1, 1], "lr": 1e-4, "weight_decay": 0.0, "seed": 42}
MIXER = {"patch_size": 4, "embed_dim": 32, "num_blocks": 2, "mlp_ratios": [4.0, 0.5], "dropout": 0.0,
         "activation": "gelu", "lr": 1e-3, "seed": 42}


def curves(ax):
    return [line for line in ax.get_lines() if line.get_gid() == "curve"]


def markers(ax):
    return [line for line in ax.get_lines() if line.get_gid() == "divergence"]


def legend_texts(figure):
    return sorted(text.get_text() for text in figure.legends[0].get_texts())


@pytest.fixture
def lr_runs(tmp_path):
    """Three MLP runs over lr, of which lr = 0.1 diverged at its last epoch (4)."""
    dirs = []
    for index, (lr, status) in enumerate([(0.1, "diverged"), (1e-3, "completed"), (1e-4, "completed")]):
        run_id = f"mlp__lr={lr}"
        dirs.append(write_run(tmp_path / run_id, run_id, "mlp", {**MLP, "lr": lr}, best_val_acc=0.4 + index / 10,
                              status=status, seed=index))
    return dirs


def test_curves_have_four_panels(lr_runs):
    figure = figures.learning_curves_figure(lr_runs, ["lr"], "Learning rate")

    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["training accuracy (%)", "training loss", "validation accuracy (%)", "validation loss"]
    for ax in figure.axes:
        assert len(curves(ax)) == 3
    assert [ax.get_yscale() for ax in figure.axes] == ["linear", "log", "linear", "log"]


def test_curves_plot_history_values(lr_runs):
    figure = figures.learning_curves_figure(lr_runs, ["lr"], "Learning rate")
    history = pd.read_csv(lr_runs[1] / "history.csv")

    val_acc = curves(figure.axes[2])[1]
    assert list(val_acc.get_xdata()) == list(history["epoch"])
    assert np.allclose(val_acc.get_ydata(), 100 * history["val_acc"])


def test_curves_legend_labels_swept_value(lr_runs):
    figure = figures.learning_curves_figure(lr_runs, ["lr"], "Learning rate")
    assert legend_texts(figure) == ["lr = 0.1 (diverged)", "lr = 1e-3", "lr = 1e-4"]


def test_diverged_line_stops_with_marker(lr_runs):
    figure = figures.learning_curves_figure(lr_runs, ["lr"], "Learning rate")
    train_loss, val_loss = figure.axes[1], figure.axes[3]

    # The last losses are NaN and inf: the line stops at epoch 3, where its marker is.
    line = curves(train_loss)[0]
    assert np.isnan(line.get_ydata()[-1])
    assert np.isfinite(line.get_ydata()[:3]).all()
    [marker] = markers(train_loss)
    assert marker.get_xdata()[0] == 3
    assert marker.get_ydata()[0] == pytest.approx(line.get_ydata()[2])
    assert len(markers(val_loss)) == 1

    # Accuracies stay finite, so the marker sits on the last epoch.
    [marker] = markers(figure.axes[0])
    assert marker.get_xdata()[0] == 4
    assert marker.get_ydata()[0] == pytest.approx(10.0)


def test_divergence_at_first_epoch_marks_top_edge(tmp_path):
    run_dir = write_run(tmp_path / "r", "mlp__lr=1", "mlp", {**MLP, "lr": 1.0}, best_val_acc=0.1, epochs=1,
                        status="diverged")
    figure = figures.learning_curves_figure([run_dir], ["lr"], "Learning rate")

    [marker] = markers(figure.axes[1])
    assert marker.get_xdata()[0] == 1
    assert marker.get_transform() != figure.axes[1].transData
    assert np.isfinite(figure.axes[1].get_ylim()).all()
    assert legend_texts(figure) == ["lr = 1 (diverged)"]


def test_non_finite_values_keep_limits(tmp_path):
    run_dir = write_run(tmp_path / "r", "mlp", "mlp", MLP, best_val_acc=0.5, epochs=5)
    history = pd.read_csv(run_dir / "history.csv")
    history.loc[1, "train_loss"] = math.inf
    history.loc[2, "val_loss"] = -math.inf
    history.loc[3, "val_acc"] = math.nan
    history.loc[0, "train_acc"] = math.inf
    history.to_csv(run_dir / "history.csv", index=False)

    figure = figures.learning_curves_figure([run_dir], [], "T")
    for ax, column in zip(figure.axes, ["train_acc", "train_loss", "val_acc", "val_loss"]):
        low, high = ax.get_ylim()
        assert np.isfinite([low, high]).all(), column
        finite = history[column][np.isfinite(history[column])]
        scale = 100 if column.endswith("acc") else 1
        assert low <= scale * finite.min(), column
        assert high >= scale * finite.max(), column
        assert high < 10 * scale * finite.max(), column


def test_log_axes_skip_non_positive(tmp_path):
    run_dir = write_run(tmp_path / "r", "mlp", "mlp", MLP, best_val_acc=0.5, epochs=4)
    history = pd.read_csv(run_dir / "history.csv")
    history.loc[1, "train_loss"] = 0.0
    history.loc[2, "train_loss"] = -1.0
    history.to_csv(run_dir / "history.csv", index=False)

    figure = figures.learning_curves_figure([run_dir], [], "T")
    train_loss = figure.axes[1]
    values = curves(train_loss)[0].get_ydata()
    assert np.isnan(values[1])
    assert np.isnan(values[2])
    assert train_loss.get_ylim()[0] > 0


def test_seeds_draw_mean_and_band(tmp_path):
    dirs = []
    for seed, accuracy in [(1, 0.4), (2, 0.6), (3, 0.5)]:
        run_id = f"mlp__seed={seed}"
        dirs.append(write_run(tmp_path / run_id, run_id, "mlp", {**MLP, "seed": seed}, best_val_acc=accuracy, seed=seed))
    figure = figures.learning_curves_figure(dirs, ["lr"], "Seeds")

    val_acc = figure.axes[2]
    [line] = curves(val_acc)
    stacked = np.stack([pd.read_csv(d / "history.csv")["val_acc"].to_numpy() for d in dirs])
    assert np.allclose(line.get_ydata(), 100 * stacked.mean(axis=0))

    [band] = [c for c in val_acc.collections if c.get_gid() == "seed-band"]
    band_values = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert band_values.min() == pytest.approx(100 * stacked.min())
    assert band_values.max() == pytest.approx(100 * stacked.max())
    assert legend_texts(figure) == ["lr = 1e-3 (3 seeds)"]


def test_seeds_partial_divergence_in_legend(tmp_path):
    dirs = [
        write_run(tmp_path / f"s{seed}", f"mlp__seed={seed}", "mlp", {**MLP, "seed": seed}, best_val_acc=0.5,
                  status="diverged" if seed == 1 else "completed", seed=seed)
        for seed in (1, 2)
    ]
    figure = figures.learning_curves_figure(dirs, ["lr"], "Seeds")
    assert legend_texts(figure) == ["lr = 1e-3 (2 seeds) (1 of 2 diverged)"]
    # The mean continues on the seed that did not diverge.
    assert np.isfinite(curves(figure.axes[1])[0].get_ydata()).all()


def test_several_sweep_keys_join_labels(tmp_path):
    dirs = [
        write_run(tmp_path / f"r{i}", f"mlp{i}", "mlp", {**MLP, "lr": lr, "activation": act}, best_val_acc=0.5, seed=i)
        for i, (lr, act) in enumerate([(1e-3, "tanh"), (5e-5, "relu")])
    ]
    figure = figures.learning_curves_figure(dirs, ["lr", "activation"], "Two keys")
    assert legend_texts(figure) == ["lr = 1e-3, tanh", "lr = 5e-5, relu"]


def test_dollar_in_title_is_literal(lr_runs):
    figure = figures.learning_curves_figure(lr_runs, ["lr"], "Cost in $ and %")
    assert figure.get_suptitle() == r"Cost in \$ and %"


def test_cli_works_with_broken_display(lr_runs, tmp_path):
    pdf, png, log = tmp_path / "f.pdf", tmp_path / "f.png", tmp_path / "f.log"
    env = {**os.environ, "DISPLAY": ":99.0", "MPLBACKEND": "TkAgg"}
    command = [sys.executable, "-m", "cifar_study.figures", "curves", "--title", "Learning rate", "--sweep-keys", "lr",
               "--runs", *map(str, lr_runs), "--pdf", str(pdf), "--png", str(png), "--log", str(log)]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert process.returncode == 0, process.stderr
    assert pdf.read_bytes().startswith(b"%PDF")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "wrote" in log.read_text()


def test_kernel_mosaic_scales_each_kernel():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 3, 3, 3)) * np.arange(1, 65)[:, None, None, None]
    rgb, grey = figures.conv1_kernel_mosaics(weight)

    # 8 x 8 kernels of 3 x 3 pixels, with a one-pixel gap around each.
    assert rgb.shape == (33, 33, 3)
    assert grey.shape == (33, 33)
    for index in range(64):
        row, column = divmod(index, 8)
        top, left = 1 + 4 * row, 1 + 4 * column
        tile = rgb[top : top + 3, left : left + 3]
        assert tile.min() == pytest.approx(0)
        assert tile.max() == pytest.approx(1)
        expected = figures.minmax_scale(weight[index]).transpose(1, 2, 0)
        assert np.allclose(tile, expected)
        grey_tile = grey[top : top + 3, left : left + 3]
        assert np.allclose(grey_tile, figures.minmax_scale(weight[index].mean(axis=0)))


def test_kernel_mosaic_rejects_non_rgb():
    with pytest.raises(ValueError, match="shape"):
        figures.conv1_kernel_mosaics(np.zeros((64, 1, 3, 3)))


def test_kernels_use_best_run(tmp_path):
    dirs = [
        write_run(tmp_path / f"wd{i}", f"resnet18__weight_decay={wd}", "resnet18", {**RESNET, "weight_decay": wd},
                  best_val_acc=accuracy, seed=i)
        for i, (wd, accuracy) in enumerate([(0.0, 0.4), (5e-5, 0.7), (1e-3, 0.5)])
    ]
    pdf, png = tmp_path / "k.pdf", tmp_path / "k.png"
    record = figures.plot_conv1_kernels(dirs, pdf, png, ["weight_decay"])

    assert record["run_id"] == "resnet18__weight_decay=5e-05"
    state = torch.load(dirs[1] / "model.pt", weights_only=True)
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    assert pdf.read_bytes().startswith(b"%PDF")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_kernels_reject_wrong_model(tmp_path):
    run_dir = write_run(tmp_path / "m", "mlp", "mlp", MLP, best_val_acc=0.5)
    with pytest.raises(KeyError, match="conv1.weight"):
        figures.plot_conv1_kernels([run_dir], tmp_path / "k.pdf", tmp_path / "k.png")


def test_kernels_reject_damaged_checkpoint(tmp_path):
    run_dir = write_run(tmp_path / "r", "resnet18", "resnet18", RESNET, best_val_acc=0.5)
    model_file = run_dir / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])

    with pytest.raises(ValueError, match="cannot read model weights") as error:
        figures.plot_conv1_kernels([run_dir], tmp_path / "k.pdf", tmp_path / "k.png")
    assert "delete the run folder" in str(error.value)
    assert str(model_file) in str(error.value)
    assert not (tmp_path / "k.pdf").exists()


def test_token_mixing_tiles_on_patch_grid():
    weight = np.stack([np.arange(16.0), -np.arange(16.0), np.zeros(16)])
    tiles = figures.token_mixing_tiles(weight)

    assert tiles.shape == (3, 4, 4)
    # Patch p of a 4 x 4 grid sits at row p // 4, column p % 4, scaled by the unit's largest |weight|.
    assert np.allclose(tiles[0], np.arange(16.0).reshape(4, 4) / 15)
    assert tiles[0][1, 2] == pytest.approx(6 / 15)
    assert np.allclose(tiles[1], -tiles[0])
    assert np.allclose(tiles[2], 0)


def test_token_mixing_rejects_non_square_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        figures.token_mixing_tiles(np.zeros((4, 12)))


def test_token_mixing_pages_of_64(tmp_path):
    dirs = [
        write_run(tmp_path / f"b{blocks}", f"mlpmixer__num_blocks={blocks}", "mlpmixer", {**MIXER, "num_blocks": blocks},
                  best_val_acc=accuracy, seed=blocks)
        for blocks, accuracy in [(1, 0.6), (2, 0.4)]
    ]
    state = torch.load(dirs[0] / "model.pt", weights_only=True)
    assert tuple(state["blocks.0.token_mixing.fc1.weight"].shape) == (128, 64)

    pdfs = [tmp_path / f"p{page}.pdf" for page in (1, 2)]
    pngs = [tmp_path / f"p{page}.png" for page in (1, 2)]
    record = figures.plot_token_mixing(dirs, pdfs, pngs, ["num_blocks"])

    assert record["run_id"] == "mlpmixer__num_blocks=1"
    for path in pdfs + pngs:
        assert path.stat().st_size > 0


def test_token_mixing_too_few_pages(tmp_path):
    run_dir = write_run(tmp_path / "m", "mlpmixer", "mlpmixer", MIXER, best_val_acc=0.5)
    with pytest.raises(ValueError, match="128 token-mixing units need 2 pages"):
        figures.plot_token_mixing([run_dir], [tmp_path / "p1.pdf"], [tmp_path / "p1.png"])


def test_gradient_panels_split_mixer(tmp_path):
    run_dir = write_run(tmp_path / "m", "mlpmixer", "mlpmixer", MIXER, best_val_acc=0.5)
    layers = list(pd.unique(pd.read_csv(run_dir / "grad_norms.csv")["layer"]))
    panels = dict(figures.gradient_panels("mlpmixer", layers))

    assert list(panels) == ["token-mixing MLPs", "channel-mixing MLPs", "embedding, norms and head"]
    assert all(".token_mixing." in name for name in panels["token-mixing MLPs"])
    assert all(".channel_mixing." in name for name in panels["channel-mixing MLPs"])
    assert panels["token-mixing MLPs"][0] == "blocks.0.token_mixing.fc1.weight"
    assert panels["token-mixing MLPs"][-1] == "blocks.1.token_mixing.fc2.bias"
    assert panels["embedding, norms and head"][0] == "patch_embed.weight"
    assert panels["embedding, norms and head"][-1] == "head.bias"
    assert sum(len(names) for names in panels.values()) == len(layers)


def test_gradient_panels_one_for_resnet():
    layers = ["conv1.weight", "bn1.weight", "fc.weight"]
    assert figures.gradient_panels("resnet18", layers) == [("all parameters", layers)]


def test_gradient_flow_rows_input_to_output(tmp_path):
    run_dir = write_run(tmp_path / "m", "mlpmixer", "mlpmixer", MIXER, best_val_acc=0.5, epochs=3)
    grad_norms = pd.read_csv(run_dir / "grad_norms.csv")
    first_token_cell = (grad_norms["layer"] == "blocks.0.token_mixing.fc1.weight") & (grad_norms["epoch"] == 1)
    grad_norms.loc[first_token_cell, "mean_norm"] = math.inf
    figure = figures.gradient_flow_figure(grad_norms, "mlpmixer", "Gradient flow")

    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [title for title, _ in figures.gradient_panels(
        "mlpmixer", list(pd.unique(grad_norms["layer"])))]
    token = panels[0]
    labels = [label.get_text() for label in token.get_yticklabels()]
    assert labels[0] == "blocks.0.token_mixing.fc1.weight"

    # Rows are parameters, columns epochs; the non-finite first cell is masked.
    image = token.get_images()[0].get_array()
    assert image.shape == (len(labels), 3)
    assert np.ma.getmaskarray(image)[0, 0]
    assert not np.ma.getmaskarray(image)[1:].any()
    expected = grad_norms[(grad_norms["layer"] == labels[1]) & (grad_norms["epoch"] == 2)]["mean_norm"].item()
    assert image[1, 1] == pytest.approx(expected)


def test_gradient_flow_uses_best_run(tmp_path):
    dirs = [
        write_run(tmp_path / act, f"mlp__activation={act}", "mlp", {**MLP, "activation": act}, best_val_acc=accuracy,
                  seed=i)
        for i, (act, accuracy) in enumerate([("relu", 0.4), ("tanh", 0.6)])
    ]
    pdf, png = tmp_path / "g.pdf", tmp_path / "g.png"
    record = figures.plot_gradient_flow(dirs, "mlp", pdf, png, "mlp_activation", ["activation"])

    assert record["run_id"] == "mlp__activation=tanh"
    assert pdf.read_bytes().startswith(b"%PDF")


def test_figure_pdfs_are_reproducible(lr_runs, tmp_path):
    first, second = tmp_path / "a.pdf", tmp_path / "b.pdf"
    figures.plot_learning_curves(lr_runs, ["lr"], "T", first, tmp_path / "a.png")
    figures.plot_learning_curves(lr_runs, ["lr"], "T", second, tmp_path / "b.png")
    assert first.read_bytes() == second.read_bytes()


def test_run_json_fixture_follows_contract(lr_runs):
    record = json.loads((lr_runs[0] / "run.json").read_text())
    assert {"run_id", "model", "settings", "num_params", "device", "precision", "versions", "status", "epochs_run",
            "best_epoch", "best_val_acc", "test_loss", "test_acc", "seconds_per_epoch"} <= set(record)
