"""Figures of the study, each written as PDF (for the report) and PNG.

- ``plot_learning_curves``: training and validation accuracy and loss against
  epochs, one line per run, or per sweep point with a min-max band over seeds.
- ``plot_conv1_kernels``: the first convolution's kernels of the best ResNet18,
  in RGB and in greyscale.
- ``plot_token_mixing``: the first token-mixing layer of the best MLP-Mixer, one
  image of weights over the patch grid per hidden unit, in pages of 64 units.
- ``plot_gradient_flow``: the mean gradient norm of every parameter per epoch.

"Best" means the highest ``best_val_acc`` among the runs given (see
``tables.best_run``). Figures are drawn on ``matplotlib.figure.Figure`` objects
with no pyplot state, under the Agg backend, so they need no display and each
process imports matplotlib once.

Run ``python -m cifar_study.figures --help`` for the command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

# Select Agg before anything imports pyplot, so a missing or broken DISPLAY
# (or an MPLBACKEND naming a GUI toolkit) cannot stop a job.
matplotlib.use("Agg", force=True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from cifar_study.io import torch_load  # noqa: E402
from cifar_study.tables import (  # noqa: E402
    best_run,
    format_value,
    read_history,
    read_run,
    run_cli,
    run_folder,
    sweep_label,
)

log = logging.getLogger(__name__)

MODEL_NAMES = {"mlp": "MLP", "resnet18": "ResNet18", "mlpmixer": "MLP-Mixer"}

# (history column, panel title, log scale) of the four learning-curve panels, row by row.
CURVE_PANELS = (
    ("train_acc", "training accuracy (%)", False),
    ("train_loss", "training loss", True),
    ("val_acc", "validation accuracy (%)", False),
    ("val_loss", "validation loss", True),
)
UNITS_PER_PAGE = 64
PNG_DPI = 150
# Drop the creation date so that the same runs give byte-identical PDFs.
PDF_METADATA = {"CreationDate": None}


def mathtext_safe(text: str) -> str:
    """Escape ``$`` so that matplotlib prints a label as written instead of reading it as mathtext."""
    return text.replace("$", r"\$")


def save_figure(figure: Figure, pdf: str | Path, png: str | Path) -> None:
    """Write ``figure`` as PDF and PNG, creating their folders."""
    for path in (pdf, png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(pdf, metadata=PDF_METADATA)
    figure.savefig(png, dpi=PNG_DPI)
    log.info("wrote %s and %s", pdf, png)


# ---------------------------------------------------------------------------
# Learning curves


@dataclass
class CurveGroup:
    """The runs of one sweep point: one run, or one run per seed."""

    label: str
    histories: list[pd.DataFrame] = field(default_factory=list)
    diverged: list[bool] = field(default_factory=list)

    @property
    def legend_label(self) -> str:
        label = self.label
        if len(self.histories) > 1:
            label += f" ({len(self.histories)} seeds)"
        count = sum(self.diverged)
        if count and count == len(self.diverged):
            label += " (diverged)"
        elif count:
            label += f" ({count} of {len(self.diverged)} diverged)"
        return label


def group_runs(run_dirs: Sequence[str | Path], sweep_keys: Sequence[str]) -> list[CurveGroup]:
    """Group runs by their swept values, in the order given, so that runs differing only in seed share a line."""
    groups: dict[tuple[str, ...], CurveGroup] = {}
    for run_dir in run_dirs:
        record = read_run(run_dir)
        settings = record.get("settings", {})
        key = tuple(format_value(settings.get(k)) for k in sweep_keys)
        group = groups.setdefault(key, CurveGroup(label=sweep_label(settings, sweep_keys)))
        group.histories.append(read_history(run_dir))
        group.diverged.append(record.get("status") == "diverged")
    return list(groups.values())


def panel_values(history: pd.DataFrame, column: str, log_scale: bool) -> pd.Series:
    """Return ``column`` by epoch as floats: accuracies in percent, values a panel cannot show as NaN.

    Non-finite values (a diverged run's last losses) and, on a log axis,
    values <= 0 become NaN, which matplotlib leaves out of lines and limits.
    """
    values = pd.to_numeric(history[column], errors="coerce").astype(float)
    values = values.where(np.isfinite(values))
    if column.endswith("_acc"):
        values = 100 * values
    if log_scale:
        values = values.where(values > 0)
    return pd.Series(values.to_numpy(), index=history["epoch"].to_numpy())


def _mark_divergence(ax, epoch: float, value: float, color) -> None:
    """Mark where a diverged line stops: on its last value, or on the top edge when it has none."""
    if math.isfinite(value):
        ax.plot([epoch], [value], marker="X", markersize=8, color=color, markeredgecolor="black", zorder=4,
                gid="divergence")
    else:
        ax.plot(
            [epoch], [0.98], marker="X", markersize=8, color=color, markeredgecolor="black",
            transform=ax.get_xaxis_transform(), clip_on=False, zorder=4, gid="divergence",
        )


def _draw_group(ax, group: CurveGroup, column: str, log_scale: bool, color) -> None:
    series = [panel_values(history, column, log_scale) for history in group.histories]
    table = pd.concat(series, axis=1).sort_index()
    epochs = table.index.to_numpy(dtype=float)

    if table.shape[1] == 1:
        mean = table.iloc[:, 0].to_numpy()
    else:
        # Mean and band over the seeds that have a finite value at each epoch.
        present = table.notna().any(axis=1).to_numpy()
        mean = np.full(len(table), np.nan)
        low = np.full(len(table), np.nan)
        high = np.full(len(table), np.nan)
        mean[present] = table[present].mean(axis=1)
        low[present] = table[present].min(axis=1)
        high[present] = table[present].max(axis=1)
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0, gid="seed-band")
    ax.plot(epochs, mean, color=color, linewidth=1.5, marker="o" if len(epochs) <= 3 else None, markersize=3,
            gid="curve")

    for history, diverged in zip(group.histories, group.diverged):
        if not diverged or history.empty:
            continue
        last_epoch = float(history["epoch"].iloc[-1])
        finite = ~np.isnan(mean) & (epochs <= last_epoch)
        if table.shape[1] == 1 and finite.any():
            # The line stops at its last finite point, and the marker goes there.
            index = np.flatnonzero(finite)[-1]
            _mark_divergence(ax, epochs[index], mean[index], color)
        else:
            _mark_divergence(ax, last_epoch, math.nan, color)


def label_log_axis(ax) -> None:
    """Label a log y axis with plain numbers (0.3, 2), and minor ticks at 2 and 5 when it spans under two decades."""
    plain = FuncFormatter(lambda value, _: format_value(float(value)))
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 100:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def row_major(items: list, columns: int) -> list:
    """Reorder ``items`` so that a legend, which matplotlib fills column by column, reads row by row."""
    rows = math.ceil(len(items) / columns)
    return [items[row * columns + column] for column in range(columns) for row in range(rows) if row * columns + column < len(items)]


def learning_curves_figure(run_dirs: Sequence[str | Path], sweep_keys: Sequence[str], title: str) -> Figure:
    """Draw the four learning-curve panels of an experiment, one line per sweep point."""
    groups = group_runs(run_dirs, sweep_keys)
    colors = matplotlib.colormaps["tab10"].colors if len(groups) <= 10 else matplotlib.colormaps["viridis"](
        np.linspace(0, 0.95, len(groups))
    )
    legend_rows = math.ceil(len(groups) / 3)
    figure = Figure(figsize=(7.5, 5.6 + 0.25 * legend_rows), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)

    for ax, (column, panel_title, log_scale) in zip(axes.flat, CURVE_PANELS):
        for index, group in enumerate(groups):
            _draw_group(ax, group, column, log_scale, colors[index % len(colors)])
        ax.set_title(panel_title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
        curves = [line for line in ax.get_lines() if line.get_gid() == "curve"]
        if not any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in curves):
            # No finite value to show: fix limits rather than let matplotlib warn about empty data.
            ax.set_ylim((0.1, 10) if log_scale else (0, 100))
        if log_scale:
            label_log_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")

    handles = [
        Line2D([], [], color=colors[i % len(colors)], marker="X" if any(g.diverged) else None,
               markeredgecolor="black", label=mathtext_safe(g.legend_label))
        for i, g in enumerate(groups)
    ]
    columns = min(3, len(handles))
    figure.legend(
        handles=row_major(handles, columns), loc="outside lower center", ncol=columns, fontsize=9, frameon=False
    )
    figure.suptitle(mathtext_safe(title), fontsize=11)
    return figure


def plot_learning_curves(
    run_dirs: Sequence[str | Path], sweep_keys: Sequence[str], title: str, pdf: str | Path, png: str | Path
) -> None:
    """Write the learning curves of an experiment's runs to ``pdf`` and ``png``."""
    save_figure(learning_curves_figure(run_dirs, sweep_keys, title), pdf, png)


# ---------------------------------------------------------------------------
# Weight images


def load_state_dict(run_dir: str | Path) -> dict[str, Any]:
    """Load ``model.pt`` of a run on the CPU."""
    path = run_folder(run_dir) / "model.pt"
    # torch_load imports torch on first use, because only the weight figures need it and the import takes over a second.
    return torch_load(
        path, ValueError,
        f"cannot read model weights {path}; delete the run folder {path.parent} and run snakemake again to retrain the run",
    )


def get_weight(state: dict[str, Any], name: str, run_dir: str | Path) -> np.ndarray:
    """Return parameter ``name`` of a state dict as a float64 array, or raise KeyError naming the run."""
    if name not in state:
        names = ", ".join(list(state)[:6])
        raise KeyError(f"{run_dir}/model.pt has no parameter {name!r} (it starts with {names}); is it the right model?")
    return state[name].detach().double().numpy()


def minmax_scale(values: np.ndarray) -> np.ndarray:
    """Scale ``values`` linearly to [0, 1], or to 0.5 everywhere when they are constant."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.full_like(values, 0.5, dtype=float)
    return (values - low) / (high - low)


def tile_mosaic(tiles: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """Lay out ``tiles`` (count, height, width[, channels]) on a grid, row by row, separated by NaN gaps."""
    count, height, width = tiles.shape[:3]
    rows = math.ceil(count / columns)
    shape = (rows * (height + gap) + gap, columns * (width + gap) + gap, *tiles.shape[3:])
    mosaic = np.full(shape, np.nan)
    for index in range(count):
        row, column = divmod(index, columns)
        top = gap + row * (height + gap)
        left = gap + column * (width + gap)
        mosaic[top : top + height, left : left + width] = tiles[index]
    return mosaic


def conv1_kernel_mosaics(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the RGB and greyscale mosaics of first-layer kernels (out, 3, kh, kw), each kernel min-max scaled alone.

    The greyscale kernel is the mean over the three input channels, scaled after averaging.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected first-layer kernels of shape (out, 3, kh, kw), got {weight.shape}")
    columns = math.ceil(math.sqrt(weight.shape[0]))
    rgb = np.stack([minmax_scale(kernel).transpose(1, 2, 0) for kernel in weight])
    grey = np.stack([minmax_scale(kernel.mean(axis=0)) for kernel in weight])
    rgb_mosaic = tile_mosaic(rgb, columns)
    # White gaps between kernels, because imshow cannot show NaN in an RGB image.
    rgb_mosaic[np.isnan(rgb_mosaic)] = 1.0
    return rgb_mosaic, tile_mosaic(grey, columns)


def plot_conv1_kernels(run_dirs: Sequence[str | Path], pdf: str | Path, png: str | Path, sweep_keys: Sequence[str] = ()) -> dict:
    """Draw the ``conv1.weight`` kernels of the best of ``run_dirs`` as RGB and greyscale grids and return that run."""
    record = best_run([read_run(run_dir) for run_dir in run_dirs])
    weight = get_weight(load_state_dict(record["run_dir"]), "conv1.weight", record["run_dir"])
    rgb, grey = conv1_kernel_mosaics(weight)

    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    rgb_ax, grey_ax = figure.subplots(1, 2)
    rgb_ax.imshow(rgb, interpolation="nearest")
    grey_cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    grey_ax.imshow(np.ma.masked_invalid(grey), cmap=grey_cmap, vmin=0, vmax=1, interpolation="nearest")
    for ax, name in ((rgb_ax, "RGB"), (grey_ax, "greyscale (mean over channels)")):
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()

    label = sweep_label(record.get("settings", {}), sweep_keys) if sweep_keys else record["run_id"]
    count, _, height, width = weight.shape
    figure.suptitle(
        mathtext_safe(f"{count} first-layer kernels ({height}x{width}) of ResNet18, {label}"), fontsize=11
    )
    save_figure(figure, pdf, png)
    return record


def token_mixing_tiles(weight: np.ndarray) -> np.ndarray:
    """Return the first token-mixing weights (hidden, patches) as one image per unit on the patch grid.

    Patches are numbered row by row, so unit ``u``'s weight on patch ``p`` lands
    at row ``p // side`` and column ``p % side``. Each unit is divided by its
    largest absolute weight, so that its image spans [-1, 1].
    """
    hidden, patches = weight.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"token-mixing weights cover {patches} patches, which is not a square grid")
    scale = np.abs(weight).max(axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    return (weight / scale).reshape(hidden, side, side)


def plot_token_mixing(
    run_dirs: Sequence[str | Path],
    pdfs: Sequence[str | Path],
    pngs: Sequence[str | Path],
    sweep_keys: Sequence[str] = (),
    units_per_page: int = UNITS_PER_PAGE,
) -> dict:
    """Draw ``blocks.0.token_mixing.fc1.weight`` of the best of ``run_dirs``, ``units_per_page`` units per page.

    ``pdfs`` and ``pngs`` name one file per page. A page past the model's last
    unit (when runs of the experiment differ in width) shows a note in place
    of weights. Returns the run shown.
    """
    if len(pdfs) != len(pngs):
        raise ValueError(f"got {len(pdfs)} PDF pages but {len(pngs)} PNG pages; give one of each per page")
    record = best_run([read_run(run_dir) for run_dir in run_dirs])
    weight = get_weight(load_state_dict(record["run_dir"]), "blocks.0.token_mixing.fc1.weight", record["run_dir"])
    tiles = token_mixing_tiles(weight)
    hidden, side = tiles.shape[0], tiles.shape[1]
    needed = math.ceil(hidden / units_per_page)
    if needed > len(pdfs):
        raise ValueError(f"{hidden} token-mixing units need {needed} pages of {units_per_page}, but {len(pdfs)} were given")

    label = sweep_label(record.get("settings", {}), sweep_keys) if sweep_keys else record["run_id"]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    columns = math.ceil(math.sqrt(units_per_page))
    for page, (pdf, png) in enumerate(zip(pdfs, pngs)):
        first = page * units_per_page
        last = min(first + units_per_page, hidden)
        figure = Figure(figsize=(6.5, 5.6), layout="constrained")
        ax = figure.subplots()
        ax.set_axis_off()
        if first < hidden:
            image = ax.imshow(
                np.ma.masked_invalid(tile_mosaic(tiles[first:last], columns)),
                cmap=cmap, vmin=-1, vmax=1, interpolation="nearest",
            )
            colorbar = figure.colorbar(image, ax=ax, shrink=0.8)
            colorbar.set_label("weight / largest |weight| of the unit")
            heading = f"units {first + 1}-{last} of {hidden}"
        else:
            ax.text(0.5, 0.5, f"this model has only {hidden} token-mixing units", ha="center", va="center")
            heading = "no units on this page"
        figure.suptitle(
            mathtext_safe(f"MLP-Mixer block 1 token-mixing weights over the {side}x{side} patch grid, {label}: {heading}"),
            fontsize=9,
        )
        save_figure(figure, pdf, png)
    return record


# ---------------------------------------------------------------------------
# Gradient flow


def gradient_panels(model: str, layers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Split parameter names into titled panels, keeping their input-to-output order.

    MLP-Mixer gets three panels (token mixing, channel mixing, the rest), and
    the other models get one.
    """
    if model != "mlpmixer":
        return [("all parameters", list(layers))]
    token = [name for name in layers if ".token_mixing." in name]
    channel = [name for name in layers if ".channel_mixing." in name]
    other = [name for name in layers if name not in token and name not in channel]
    panels = [("token-mixing MLPs", token), ("channel-mixing MLPs", channel), ("embedding, norms and head", other)]
    return [(title, names) for title, names in panels if names]


def gradient_matrix(grad_norms: pd.DataFrame, layers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (epochs, matrix) with ``mean_norm`` of each layer (rows) per epoch (columns), NaN where missing."""
    table = grad_norms.pivot_table(index="layer", columns="epoch", values="mean_norm", aggfunc="first", dropna=False)
    table = table.reindex(index=list(layers))
    return table.columns.to_numpy(), table.to_numpy(dtype=float)


def gradient_flow_figure(grad_norms: pd.DataFrame, model: str, title: str) -> Figure:
    """Draw the gradient norms as heat maps, parameters from input (top) to output (bottom), one column per epoch."""
    layers = list(pd.unique(grad_norms["layer"]))
    panels = gradient_panels(model, layers)
    values = pd.to_numeric(grad_norms["mean_norm"], errors="coerce").to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else LogNorm(vmin=1e-3, vmax=1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")

    rows = sum(len(names) for _, names in panels)
    fontsize = max(4.0, min(8.0, 300 / max(rows, 1)))
    figure = Figure(figsize=(7.5, min(11.0, 1.6 + 0.13 * rows + 0.35 * len(panels))), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, height_ratios=[len(names) for _, names in panels], squeeze=False)[:, 0]

    image = None
    for ax, (panel_title, names) in zip(axes, panels):
        epochs, matrix = gradient_matrix(grad_norms, names)
        # Non-finite norms (a diverged step) and zeros cannot sit on a log scale: they show in grey.
        masked = np.ma.masked_where(~np.isfinite(matrix) | (matrix <= 0), matrix)
        extent = (epochs.min() - 0.5, epochs.max() + 0.5, len(names) - 0.5, -0.5) if len(epochs) else None
        image = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", extent=extent)
        ax.set_yticks(range(len(names)), [mathtext_safe(name) for name in names], fontsize=fontsize)
        ax.set_title(panel_title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("epoch")
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9 if rows < 30 else 0.6)
    # Grey cells (not finite, or 0) are explained in the captions; the label stays short to fit small figures.
    colorbar.set_label("mean gradient L2 norm")
    figure.suptitle(mathtext_safe(title), fontsize=10)
    return figure


def plot_gradient_flow(
    run_dirs: Sequence[str | Path],
    model: str,
    pdf: str | Path,
    png: str | Path,
    experiment_id: str = "",
    sweep_keys: Sequence[str] = (),
) -> dict:
    """Draw the gradient flow of the best of ``run_dirs`` and return the run shown."""
    record = best_run([read_run(run_dir) for run_dir in run_dirs])
    grad_norms = pd.read_csv(Path(record["run_dir"]) / "grad_norms.csv")
    if grad_norms.empty:
        raise ValueError(f"{record['run_dir']}/grad_norms.csv has no rows: the run recorded no gradient norms")

    label = sweep_label(record.get("settings", {}), sweep_keys) if sweep_keys else record["run_id"]
    where = f"best run of {experiment_id}: {label}" if experiment_id else label
    title = f"Gradient flow of {MODEL_NAMES.get(model, model)} ({where})"
    save_figure(gradient_flow_figure(grad_norms, model, title), pdf, png)
    return record


# ---------------------------------------------------------------------------
# Command line


def _curves_command(args: argparse.Namespace) -> None:
    plot_learning_curves(args.runs, args.sweep_keys, args.title, args.pdf, args.png)


def _kernels_command(args: argparse.Namespace) -> None:
    plot_conv1_kernels(args.runs, args.pdf, args.png, args.sweep_keys)


def _token_mixing_command(args: argparse.Namespace) -> None:
    plot_token_mixing(args.runs, args.pdf, args.png, args.sweep_keys, args.units_per_page)


def _gradient_flow_command(args: argparse.Namespace) -> None:
    plot_gradient_flow(args.runs, args.model, args.pdf, args.png, args.experiment, args.sweep_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_study.figures", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    curves = commands.add_parser("curves", help="learning curves of one experiment")
    curves.add_argument("--title", required=True, help="figure title, usually the experiment's title")
    curves.set_defaults(handler=_curves_command)

    kernels = commands.add_parser("kernels", help="conv1 kernels of the best ResNet18 run")
    kernels.set_defaults(handler=_kernels_command)

    token_mixing = commands.add_parser("token-mixing", help="first token-mixing weights of the best MLP-Mixer run")
    token_mixing.add_argument("--units-per-page", type=int, default=UNITS_PER_PAGE, help="hidden units per page")
    token_mixing.set_defaults(handler=_token_mixing_command)

    gradient_flow = commands.add_parser("gradient-flow", help="per-parameter gradient norms of the best run")
    gradient_flow.add_argument("--model", required=True, help="model of the runs: mlp, resnet18 or mlpmixer")
    gradient_flow.add_argument("--experiment", default="", help="experiment id, named in the title")
    gradient_flow.set_defaults(handler=_gradient_flow_command)

    for command in (curves, kernels, token_mixing, gradient_flow):
        command.add_argument(
            "--runs", nargs="+", required=True, help="run folders (results/runs/<run-id>) or their run.json"
        )
        command.add_argument("--sweep-keys", nargs="*", default=[], help="settings the experiment sweeps, for labels")
        many = command is token_mixing
        command.add_argument("--pdf", required=True, nargs="+" if many else None, help="PDF file(s) to write")
        command.add_argument("--png", required=True, nargs="+" if many else None, help="PNG file(s) to write")
        command.add_argument("--log", help="log file (default: stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
