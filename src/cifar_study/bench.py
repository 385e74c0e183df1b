"""Measure how fast the pipeline trains, what its bookkeeping costs and whether its speed costs accuracy.

    python -m cifar_study.bench --data results/data/cifar10.pt          # speed of the three models
    python -m cifar_study.bench --root data/cifar10 --json              # the same, from an image folder
    python -m cifar_study.bench overheads --data results/data/cifar10.pt
    python -m cifar_study.bench accuracy --preset quick --data results/data/cifar10.pt
    python -m cifar_study.bench profile --data results/data/cifar10.pt --models resnet18
    python -m cifar_study.bench compare-runs --runs bf16/results/runs fp32/results/runs
    python -m cifar_study.bench gpu-estimate

Modes:
  speed (default)  Time training steps of each model, in one process and on the
                   same real images, with the pipeline's loop (engine.train_epoch
                   with the run's fast path) and with the tutorial-style loop of
                   ``cifar_study.reference``. Prints images/s, seconds per
                   45,000-image epoch, the speedup, the training FLOP/s as a
                   share of the measured matmul throughput of the precision in
                   use, and the cost of gradient-norm tracking.
  overheads        Time from process start to the first training step of a job,
                   and the wall time of ``snakemake -n`` on config.yaml.
  accuracy         Train each model with the fast path, with the pipeline in fp32
                   and with the reference loop, at the same seed and epochs on a
                   small real subset, and compare validation accuracy.
  compare-runs     Pair the runs of two results folders by run id (for example
                   the same preset trained with precision auto and fp32) and
                   give the differences of their best validation and their test
                   accuracy, per run and per model.
  profile          Profile pipeline training steps with torch.profiler and split
                   their time into operator groups (matmuls and convolutions,
                   normalisation, activations, copies, optimizer, ...). The
                   training FLOPs over the time of the matmul and convolution
                   kernels alone give the share of the measured matmul
                   throughput that the step would reach if nothing else took
                   time: the ceiling of the speed mode's matmul share.
  gpu-estimate     Estimate the wall time of the study of config.yaml on one GPU
                   from FLOPs per step and an assumed share of the GPU's peak.

Timings exclude warm-up steps and are medians over ``--repeats``; the blocks of
the loops being compared alternate, so that load from other processes falls on
both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cifar_study import reference
from cifar_study.config import load_config
from cifar_study.data import CLASSES, DataError, _decode_files, load_prepared
from cifar_study.devices import FastPath, choose_fast_path, place_model
from cifar_study.engine import accumulate_grad_norms, evaluate, train_epoch
from cifar_study.models import MODELS, build_model
from cifar_study.train import describe_device, make_optimizer

MODES = ("speed", "overheads", "accuracy", "compare-runs", "profile", "gpu-estimate", "startup-probe")
FULL_EPOCH_IMAGES = 45_000
MATMUL_SIZES = {"cpu": (2048, 4096), "cuda": (4096, 8192)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Timed blocks last about --block-seconds unless --steps is given, and have at
# least MIN_STEPS steps. Blocks of seconds keep the few batches that the
# reference loop's workers prefetch during its warm-up a small part of a block.
MIN_STEPS = 4

# Subsets of the training and validation images, and epochs, for the accuracy comparison.
ACCURACY_PRESETS = {
    "tiny": {"train_images": 256, "val_images": 100, "epochs": 1},
    "quick": {"train_images": 2560, "val_images": 1000, "epochs": 3},
}


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _cpu_seconds() -> tuple[float, float, float]:
    """Return the wall time, the busy CPU seconds of the whole machine and those of this process and its reaped children."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:  # not Linux: the load of other processes stays unknown
        return time.perf_counter(), math.nan, sum(os.times()[:4])
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(os.times()[:4])
    return time.perf_counter(), busy, own


def _other_load(start: tuple[float, float, float]) -> float:
    """Return the mean number of CPUs that other processes kept busy since ``start``, from /proc/stat."""
    wall, busy, own = _cpu_seconds()
    return max(0.0, (busy - start[1]) - (own - start[2])) / (wall - start[0])


# Data ---------------------------------------------------------------------


def load_images(
    data: str | None, root: str | None, train_count: int, val_count: int = 0
) -> dict[str, torch.Tensor]:
    """Load ``train_count`` training and ``val_count`` validation images of real CIFAR-10 onto the CPU.

    Both subsets hold every class equally (up to one image) and interleave the
    classes, because prepared files and image folders list the images class
    by class. From a prepared file (``--data``) the images come from its train
    and validation splits. From an image folder (``--root``) they are the
    first files of each class in ``train/`` and the validation images the
    last ones, so the two never overlap.
    """
    if data:
        prepared = load_prepared(data)
        subset = {}
        for split, count in (("train", train_count), ("val", val_count)):
            index = balanced_subset(prepared[f"{split}_labels"], count, f"{split} split of {data!r}")
            subset[f"{split}_images"] = prepared[f"{split}_images"][index].clone()
            subset[f"{split}_labels"] = prepared[f"{split}_labels"][index].clone()
        return subset
    if root:
        return _read_folder_subset(Path(root), train_count, val_count)
    raise DataError("no data given; pass --data results/data/cifar10.pt or --root with a CIFAR-10 image folder")


def balanced_subset(labels: torch.Tensor, count: int, source: str) -> torch.Tensor:
    """Return the indices of ``count`` images, the first of each class in turn: class 0, 1, ..., 9, 0, 1, ..."""
    by_class = [torch.nonzero(labels == label).flatten() for label in range(len(CLASSES))]
    per_class = math.ceil(count / len(CLASSES))
    if any(len(indices) < per_class for indices in by_class):
        smallest = min(len(indices) for indices in by_class)
        raise DataError(
            f"{count} images requested from the {source}, which has only {smallest} images of some class; "
            f"request at most {smallest * len(CLASSES)} images"
        )
    return torch.stack([indices[:per_class] for indices in by_class], dim=1).flatten()[:count]


def _read_folder_subset(root: Path, train_count: int, val_count: int) -> dict[str, torch.Tensor]:
    folder = root / "train"
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} not found; pass --root with train/<class>/*.jpg inside")
    train_per_class = math.ceil(train_count / len(CLASSES))
    val_per_class = math.ceil(val_count / len(CLASSES))
    train_paths, val_paths = [], []
    for name in CLASSES:
        files = sorted((folder / name).glob("*")) if (folder / name).is_dir() else []
        if len(files) < train_per_class + val_per_class:
            raise DataError(
                f"class folder {str(folder / name)!r} contains {len(files)} images, fewer than the "
                f"{train_per_class + val_per_class} requested; request fewer images"
            )
        train_paths.append(files[:train_per_class])
        val_paths.append(files[len(files) - val_per_class :])

    subset = {}
    for split, paths, count in (("train", train_paths, train_count), ("val", val_paths, val_count)):
        # Column-major over (class, position) interleaves the classes.
        pairs = [(paths[label][i], label) for i in range(len(paths[0])) for label in range(len(CLASSES))][:count]
        subset[f"{split}_images"] = (
            _decode_files([path for path, _ in pairs]) if pairs else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
        )
        subset[f"{split}_labels"] = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return subset


def read_study_config(config_path: str) -> dict[str, Any]:
    """Read the study config at ``config_path``, or raise FileNotFoundError naming it."""
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"config {config_path!r} not found; run from the repository root or pass --config")
    return load_config(config_path)


def load_study_settings(config_path: str, model_name: str) -> dict[str, Any]:
    """Return the default settings of ``model_name`` in the study config: training defaults plus model defaults."""
    config = read_study_config(config_path)
    return {**config["defaults"], **config["models"][model_name]}


def model_args(model_name: str, settings: dict[str, Any]) -> dict[str, Any]:
    from cifar_study.config import MODEL_ARGS

    return {key: value for key, value in settings.items() if key in MODEL_ARGS[model_name]}


# FLOPs and matmul throughput ---------------------------------------------


def count_train_flops(model_name: str, args: dict[str, Any], batch_size: int) -> tuple[int, int]:
    """Return the FLOPs of one training step (forward + backward) and of one forward pass.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device,
    so nothing is computed. It counts matrix multiplications and convolutions
    (2 FLOPs per multiply-add), not elementwise work or the optimizer.
    """
    with torch.device("meta"):
        model = build_model(model_name, **args)
        images = torch.empty(batch_size, 3, 32, 32)
        targets = torch.zeros(batch_size, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), targets).backward()
    train_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return train_flops, counter.get_total_flops()


def matmul_throughput(device: torch.device, precision: str, sizes: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Return the median FLOP/s of square matmuls of each size in ``sizes``, after one warm-up product."""
    dtype = DTYPES[precision]
    results = {}
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        seconds = []
        for _ in range(repeats):
            start = _sync_time(device)
            a @ b
            seconds.append(_sync_time(device) - start)
        results[size] = 2 * size**3 / _median(seconds)
    return results


# Speed ----------------------------------------------------------------------


@dataclass
class SpeedSetup:
    """Everything one model's speed measurement needs, built once per model and device."""

    model_name: str
    device: torch.device
    fast_path: FastPath
    settings: dict[str, Any]
    batch_size: int
    flops_per_step: int


def speed_setup(args: argparse.Namespace, model_name: str, device: torch.device) -> SpeedSetup:
    """Build the setup of one model on ``device`` from the study config and the command-line overrides."""
    settings = load_study_settings(args.config, model_name)
    fast_path = choose_fast_path(model_name, device, args.precision or settings["precision"], args.compile)
    if args.channels_last != "auto":
        fast_path = dataclasses.replace(fast_path, channels_last=args.channels_last == "on")
    batch_size = args.batch_size or settings["batch_size"]
    flops, _ = count_train_flops(model_name, model_args(model_name, settings), batch_size)
    return SpeedSetup(model_name, device, fast_path, settings, batch_size, flops)


def _pipeline_block(
    setup, step_model, optimizer, images, labels, generator, track_grad_norms: bool, steps: int | None = None,
) -> float:
    """Return the seconds of ``steps`` training steps, one pass over the images when None.

    More steps than the images hold pass over them again, the last pass over
    the first images only.
    """
    pass_steps = len(labels) // setup.batch_size
    if pass_steps == 0:
        raise ValueError(f"a timed block needs at least one batch of {setup.batch_size} images, got {len(labels)}; "
                         f"load more images or lower --batch-size")
    remaining = steps or pass_steps
    start = _sync_time(setup.device)
    while remaining > 0:
        count = min(remaining, pass_steps)
        train_epoch(
            step_model, optimizer, images[: count * setup.batch_size], labels[: count * setup.batch_size],
            setup.batch_size, generator, setup.fast_path.precision,
            augment=setup.settings["augment"], channels_last=setup.fast_path.channels_last,
            track_grad_norms=track_grad_norms, progress_label=f"bench {setup.model_name}",
        )
        remaining -= count
    return _sync_time(setup.device) - start


def _reference_block(setup, model, optimizer, images, labels, steps: int, warmup: int, seed: int) -> float:
    # A typical tutorial leaves cudnn.benchmark at its default (off).
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        loader = reference.make_loader(
            images, labels, setup.batch_size, setup.device, train=True, seed=seed,
            num_samples=(warmup + steps) * setup.batch_size,
        )
        # Each block starts its own workers; the warm-up steps absorb their start.
        batches = iter(loader)
        reference.train_batches(model, optimizer, batches, setup.device, warmup)
        start = _sync_time(setup.device)
        reference.train_batches(model, optimizer, batches, setup.device, steps)
        seconds = _sync_time(setup.device) - start
        del batches
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return seconds


def _grad_norm_seconds(params: list[torch.Tensor], device: torch.device, repeats: int = 30) -> float:
    """Return the median time of one step's gradient-norm bookkeeping on the current gradients."""
    norm_sum = torch.zeros(len(params), device=device)
    norm_max = torch.zeros(len(params), device=device)
    accumulate_grad_norms(params, norm_sum, norm_max)
    seconds = []
    for _ in range(repeats):
        start = _sync_time(device)
        accumulate_grad_norms(params, norm_sum, norm_max)
        seconds.append(_sync_time(device) - start)
    return _median(seconds)


def _block_steps(args: argparse.Namespace, step_seconds: float) -> int:
    """Return the steps of one timed block: --steps, or enough for --block-seconds at ``step_seconds`` a step."""
    return args.steps or max(MIN_STEPS, math.ceil(args.block_seconds / step_seconds))


def measure_speed(setup: SpeedSetup, data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """Time the pipeline loop (with and without gradient norms) and the reference loop for one model."""
    device, batch_size, warmup = setup.device, setup.batch_size, args.warmup
    args_of_model = model_args(setup.model_name, setup.settings)
    seed = setup.settings["seed"]

    # The pipeline: uint8 images on the device, the run's fast path and optimizer.
    torch.manual_seed(seed)
    model, step_model = place_model(build_model(setup.model_name, **args_of_model), device, setup.fast_path)
    optimizer = make_optimizer(model, setup.settings)
    generator = torch.Generator(device=device).manual_seed(seed)
    images, labels = data["train_images"].to(device), data["train_labels"].to(device)
    pipeline_args = (setup, step_model, optimizer, images, labels, generator)
    for track in (True, False):
        _pipeline_block(*pipeline_args, track, warmup)
    # A second, timed warm-up block sizes the timed blocks. A block longer
    # than the loaded images passes over them again, so that a fast model's
    # blocks still last about --block-seconds.
    pipeline_steps = _block_steps(args, _pipeline_block(*pipeline_args, True, warmup) / warmup)

    # The reference: its own fp32 copy of the same initial weights, default AdamW.
    torch.manual_seed(seed)
    ref_model = build_model(setup.model_name, **args_of_model).to(device)
    ref_optimizer = reference.make_optimizer(ref_model, setup.settings["lr"], setup.settings["weight_decay"])
    ref_args = (setup, ref_model, ref_optimizer, data["train_images"], data["train_labels"])
    calibration_steps = args.steps or 2
    reference_steps = _block_steps(args, _reference_block(*ref_args, calibration_steps, warmup, seed) / calibration_steps)

    # Each repeat also times a matmul, so that the training FLOP/s can be
    # compared with a matmul measured under the same load from other processes.
    matmul_size = min(args.matmul_sizes or MATMUL_SIZES[device.type])
    cpu_start = _cpu_seconds()
    pipeline_s, no_norms_s, reference_s, matmul_flop_per_s = [], [], [], []
    for repeat in range(args.repeats):
        reference_s.append(_reference_block(*ref_args, reference_steps, warmup, seed + 1 + repeat))

        # Untimed steps bring the pipeline's weights back into the caches and
        # let the reference's loader workers exit. The two pipeline blocks
        # then swap order every repeat, so that neither always comes first.
        _pipeline_block(*pipeline_args, True, warmup)
        for track in (True, False) if repeat % 2 == 0 else (False, True):
            seconds = _pipeline_block(*pipeline_args, track, pipeline_steps)
            (pipeline_s if track else no_norms_s).append(seconds)
        matmul_flop_per_s.append(matmul_throughput(device, setup.fast_path.precision, (matmul_size,), 3)[matmul_size])
    other_load = _other_load(cpu_start)

    # The last pipeline block left its gradients in place; time the bookkeeping on them.
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm_s = _grad_norm_seconds(params, device)

    pipeline_rate = pipeline_steps * batch_size / _median(pipeline_s)
    no_norms_rate = pipeline_steps * batch_size / _median(no_norms_s)
    reference_rate = reference_steps * batch_size / _median(reference_s)
    return {
        "pipeline_img_per_s": pipeline_rate,
        "reference_img_per_s": reference_rate,
        "speedup": pipeline_rate / reference_rate,
        "pipeline_epoch_s": FULL_EPOCH_IMAGES / pipeline_rate,
        "reference_epoch_s": FULL_EPOCH_IMAGES / reference_rate,
        # The fastest repeat of each loop: what the machine gives with the least load from other processes.
        "pipeline_img_per_s_best": pipeline_steps * batch_size / min(pipeline_s),
        "reference_img_per_s_best": reference_steps * batch_size / min(reference_s),
        "pipeline_no_grad_norms_img_per_s": no_norms_rate,
        # Share of the training time that gradient-norm tracking adds, from the
        # two pipeline loops, paired within each repeat, and from timing it alone.
        "grad_norm_cost": _median([with_norms / without - 1 for with_norms, without in zip(pipeline_s, no_norms_s)]),
        "grad_norm_cost_isolated": grad_norm_s * pipeline_rate / batch_size,
        # Median over repeats of the training FLOP/s over the matmul FLOP/s of the same repeat.
        "matmul_share_paired": _median([
            setup.flops_per_step * pipeline_steps / seconds / flop_per_s
            for seconds, flop_per_s in zip(pipeline_s, matmul_flop_per_s)
        ]),
        "pipeline_steps": pipeline_steps,
        "reference_steps": reference_steps,
        # CPUs kept busy by other processes during the timed repeats; 0 on an idle machine.
        "other_load": other_load,
    }


def run_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    for model_name in args.models:
        batch_size = args.batch_size or load_study_settings(args.config, model_name)["batch_size"]
        # Longer blocks pass over the images again, so MIN_STEPS batches are enough.
        needed = MIN_STEPS * batch_size
        if needed > args.images:
            raise ValueError(
                f"timed blocks of {batch_size} images a step ({model_name}) need at least {needed} images "
                f"({MIN_STEPS} steps) but --images is {args.images}; raise --images or lower --batch-size"
            )
    data = load_images(args.data, args.root, args.images)
    rows = []
    for device in _devices(args.device):
        sizes = tuple(args.matmul_sizes) if args.matmul_sizes else MATMUL_SIZES[device.type]
        matmul_repeats = max(args.repeats, 3)
        # Measured before and after the models, keeping the higher median, so
        # that a burst of load during one measurement cannot inflate the matmul share.
        matmul = {p: matmul_throughput(device, p, sizes, matmul_repeats) for p in DTYPES if _supports(device, p)}
        device_rows = []
        for model_name in args.models:
            setup = speed_setup(args, model_name, device)
            result = measure_speed(setup, data, args)
            device_rows.append((setup, result))
            if not args.json:
                print(f"measured {model_name} on {device}", file=sys.stderr)
        for precision in matmul:
            again = matmul_throughput(device, precision, sizes, matmul_repeats)
            matmul[precision] = {n: max(matmul[precision][n], again[n]) for n in sizes}

        for setup, result in device_rows:
            peak = max(matmul[setup.fast_path.precision].values())
            train_flop_per_s = setup.flops_per_step * result["pipeline_img_per_s"] / setup.batch_size
            row = {
                "model": setup.model_name,
                "device": device.type,
                "precision": setup.fast_path.precision,
                "pipeline_img_per_s": result["pipeline_img_per_s"],
                "reference_img_per_s": result["reference_img_per_s"],
                "speedup": result["speedup"],
                "matmul_share": train_flop_per_s / peak,
                "device_name": describe_device(device),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "batch_size": setup.batch_size,
                "channels_last": setup.fast_path.channels_last,
                "compile": setup.fast_path.compile,
                "flops_per_step": setup.flops_per_step,
                "train_flop_per_s": train_flop_per_s,
                "matmul_flop_per_s": peak,
                "matmul_flop_per_s_by_size": {str(n): v for n, v in matmul[setup.fast_path.precision].items()},
                "matmul_flop_per_s_by_precision": {p: max(by_size.values()) for p, by_size in matmul.items()},
                **{k: v for k, v in result.items() if k not in ("pipeline_img_per_s", "reference_img_per_s", "speedup")},
                "warmup_steps": args.warmup,
                "repeats": args.repeats,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        if not args.json:
            _print_speed_table(device, matmul, [r for r in rows if r["device"] == device.type], args)
    return rows


def _print_speed_table(device: torch.device, matmul: dict[str, dict[int, float]], rows: list[dict], args) -> None:
    print(f"\n{describe_device(device)}; torch {torch.__version__}, torchvision {torchvision.__version__}"
          + (f"; {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    for precision, by_size in matmul.items():
        sizes = ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in by_size.items())
        print(f"matmul {precision}: {max(by_size.values()) / 1e9:.0f} GFLOP/s (by size {sizes})")
    steps = ", ".join(f"{row['model']} {row['pipeline_steps']}/{row['reference_steps']}" for row in rows)
    print(f"steps of {rows[0]['batch_size'] if rows else '?'} images per repeat (pipeline/reference): {steps}; "
          f"median of {args.repeats} repeats, {args.warmup} warm-up steps before each")
    header = (f"{'model':<10}{'precision':>10}{'pipeline img/s':>16}{'reference img/s':>17}{'speedup':>9}"
              f"{'epoch s pipe/ref':>19}{'GFLOP/step':>12}{'matmul share':>19}{'grad-norm cost':>16}{'other load':>12}")
    print(header)
    for row in rows:
        epoch = f"{row['pipeline_epoch_s']:.0f}/{row['reference_epoch_s']:.0f}"
        cost = f"{row['grad_norm_cost']:+.1%} ({row['grad_norm_cost_isolated']:.1%})"
        share = f"{row['matmul_share']:.0%} ({row['matmul_share_paired']:.0%})"
        load = f"{row['other_load']:.2f}"
        print(f"{row['model']:<10}{row['precision']:>10}{row['pipeline_img_per_s']:>16.0f}"
              f"{row['reference_img_per_s']:>17.0f}{row['speedup']:>8.2f}x{epoch:>19}"
              f"{row['flops_per_step'] / 1e9:>12.1f}{share:>19}{cost:>16}{load:>12}")
    print("matmul share: of the best matmul throughput (paired with a matmul in each repeat); "
          "grad-norm cost: with vs without tracking in the pipeline loop (tracking timed alone); "
          "other load: CPUs kept busy by other processes")


def _devices(requested: list[str] | None) -> list[torch.device]:
    if requested:
        devices = []
        for name in requested:
            try:
                device = torch.device(name)
            except RuntimeError:
                raise ValueError(f"invalid --device {name!r}; use cpu, cuda or cuda:N") from None
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"invalid --device {name!r}; use cpu, cuda or cuda:N")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
            devices.append(device)
        return devices
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _supports(device: torch.device, precision: str) -> bool:
    if precision == "fp32":
        return True
    try:
        choose_fast_path("mlp", device, "bf16")
    except ValueError:
        return False
    return True


# Overheads --------------------------------------------------------------------


# Run by ``overheads`` as a fresh interpreter: it imports what ``python -m
# cifar_study.train`` imports, notes the time, then runs the startup probe.
STARTUP_SCRIPT = (
    "import json, os, sys, time\n"
    "import cifar_study.train\n"
    "imported = json.dumps([time.time(), sum(os.times()[:2])])\n"
    "from cifar_study.bench import main\n"
    "sys.exit(main(['startup-probe', '--imported-at', imported, *sys.argv[1:]]))\n"
)


def _mark() -> tuple[float, float]:
    """Return the wall-clock time and the CPU seconds (user + system, all threads) of this process."""
    return time.time(), sum(os.times()[:2])


def startup_probe(args: argparse.Namespace) -> None:
    """Do what a training job does before its first step, then one step, and print the time of each phase.

    Each mark is (wall-clock seconds since the epoch, CPU seconds of this
    process), so that ``overheads`` can subtract its spawn time.
    """
    marks = {"imports": json.loads(args.imported_at)}
    settings = load_study_settings(args.config, args.probe_model)
    device = _devices(args.device)[0]
    fast_path = choose_fast_path(args.probe_model, device, settings["precision"], settings["compile"])
    torch.manual_seed(settings["seed"])
    model = build_model(args.probe_model, **model_args(args.probe_model, settings))
    data = load_prepared(args.data, device)
    marks["data_and_model"] = _mark()

    model, step_model = place_model(model, device, fast_path)
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator(device=device).manual_seed(settings["seed"])
    batch = settings["batch_size"]
    train_epoch(
        step_model, optimizer, data["train_images"][:batch], data["train_labels"][:batch], batch, generator,
        fast_path.precision, augment=settings["augment"], channels_last=fast_path.channels_last,
    )
    marks["first_step"] = _mark()
    print(json.dumps(marks))


def _time_job_start(args: argparse.Namespace, model_name: str) -> dict[str, dict[str, float]]:
    """Return the median wall and CPU seconds from process start to the end of each startup phase."""
    command = [sys.executable, "-c", STARTUP_SCRIPT, "--data", args.data, "--probe-model", model_name,
               "--config", args.config]
    if args.device:
        command += ["--device", args.device[0]]
    phases = []
    for _ in range(args.repeats):
        spawned = time.time()
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"startup probe of {model_name} failed:\n{process.stderr[-2000:]}")
        marks = json.loads(process.stdout.strip().splitlines()[-1])
        phases.append({name: (wall - spawned, cpu) for name, (wall, cpu) in marks.items()})
    return {
        name: {"wall_s": _median([p[name][0] for p in phases]), "cpu_s": _median([p[name][1] for p in phases])}
        for name in phases[0]
    }


def _time_dry_run(args: argparse.Namespace) -> dict[str, float]:
    """Return the median wall and CPU seconds of ``snakemake -n`` on the config, after one untimed run."""
    workdir = Path(args.config).resolve().parent
    # --nolock keeps the dry run from touching the locks of a workflow running in the same folder.
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--nolock",
               "--configfile", Path(args.config).name]
    wall, cpu = [], []
    for attempt in range(args.repeats + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise RuntimeError(f"snakemake -n failed in {workdir}:\n{process.stderr[-2000:]}")
        if attempt:  # the first run fills the file system cache
            wall.append(elapsed)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"wall_s": _median(wall), "cpu_s": _median(cpu)}


def run_overheads(args: argparse.Namespace) -> dict[str, Any]:
    if not args.data:
        raise DataError("overheads needs --data, the prepared file that a training job loads")
    cpu_start = _cpu_seconds()
    result: dict[str, Any] = {
        "job_start": {model_name: _time_job_start(args, model_name) for model_name in args.models},
        "snakemake_dry_run": _time_dry_run(args),
        "repeats": args.repeats,
        "data": args.data,
    }
    result["other_load"] = _other_load(cpu_start)

    if args.json:
        print(json.dumps(result))
        return result
    print("seconds from process start to the end of each phase, wall (CPU)")
    print(f"  {'model':<12}{'imports':>16}{'data + model':>16}{'first step':>16}")
    for model_name, phases in result["job_start"].items():
        cells = "".join(f"{phases[name]['wall_s']:>9.2f} ({phases[name]['cpu_s']:.2f})"
                        for name in ("imports", "data_and_model", "first_step"))
        print(f"  {model_name:<12}{cells}")
    dry_run = result["snakemake_dry_run"]
    print(f"snakemake -n on {Path(args.config).name}: {dry_run['wall_s']:.2f} s wall ({dry_run['cpu_s']:.2f} s CPU), "
          f"median of {args.repeats}; other processes kept {result['other_load']:.2f} CPUs busy")
    return result


# Accuracy -------------------------------------------------------------------


def _train_pipeline(model_name, settings, data, device, precision: str, epochs: int, seed: int) -> float:
    fast_path = choose_fast_path(model_name, device, precision)
    torch.manual_seed(seed)
    model, step_model = place_model(build_model(model_name, **model_args(model_name, settings)), device, fast_path)
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_images, train_labels = data["train_images"].to(device), data["train_labels"].to(device)
    val_images, val_labels = data["val_images"].to(device), data["val_labels"].to(device)
    for _ in range(epochs):
        train_epoch(step_model, optimizer, train_images, train_labels, settings["batch_size"], generator,
                    fast_path.precision, augment=settings["augment"], channels_last=fast_path.channels_last,
                    track_grad_norms=True)
    return evaluate(step_model, val_images, val_labels, settings["eval_batch_size"], fast_path.precision,
                    fast_path.channels_last).acc


def _train_reference(model_name, settings, data, device, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model(model_name, **model_args(model_name, settings)).to(device)
    optimizer = reference.make_optimizer(model, settings["lr"], settings["weight_decay"])
    batch = settings["batch_size"]
    for epoch in range(epochs):
        loader = reference.make_loader(data["train_images"], data["train_labels"], batch, device, train=True,
                                       seed=seed + epoch)
        reference.train_batches(model, optimizer, iter(loader), device, len(loader))
    val_loader = reference.make_loader(data["val_images"], data["val_labels"], settings["eval_batch_size"], device,
                                       train=False, seed=seed)
    return reference.evaluate(model, val_loader, device)[1]


def run_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    preset = ACCURACY_PRESETS[args.preset]
    data = load_images(args.data, args.root, preset["train_images"], preset["val_images"])
    device = _devices(args.device)[0]
    rows = []
    for model_name in args.models:
        settings = load_study_settings(args.config, model_name)
        for seed in args.seeds:
            start = time.perf_counter()
            fast_precision = choose_fast_path(model_name, device, args.precision or settings["precision"]).precision
            row = {
                "model": model_name,
                "device": device.type,
                "preset": args.preset,
                "seed": seed,
                "epochs": preset["epochs"],
                "train_images": preset["train_images"],
                "val_images": preset["val_images"],
                "fast_precision": fast_precision,
                "fast_val_acc": _train_pipeline(model_name, settings, data, device, fast_precision, preset["epochs"], seed),
                "pipeline_fp32_val_acc": _train_pipeline(model_name, settings, data, device, "fp32", preset["epochs"], seed),
                "reference_val_acc": _train_reference(model_name, settings, data, device, preset["epochs"], seed),
            }
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{model_name:<10} seed {seed:<4} val_acc fast ({fast_precision}) {row['fast_val_acc']:.4f}  "
                      f"pipeline fp32 {row['pipeline_fp32_val_acc']:.4f}  reference fp32 {row['reference_val_acc']:.4f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
    return rows


# GPU estimate ------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Count the aten operators dispatched while active, a proxy for GPU kernel launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(model_name: str, args: dict[str, Any], settings: dict[str, Any]) -> float:
    """Return the aten operators one pipeline training step dispatches, counted on the CPU.

    Augmentation, autocast casts, forward, backward, gradient norms and the
    optimizer are all included. Two epochs of 2 and 4 tiny steps are counted
    and their difference halved, so per-epoch work (the shuffle, the final
    host sync) drops out. The count does not depend on the batch size.
    """
    fast_path = choose_fast_path(model_name, torch.device("cpu"), settings["precision"])
    model = build_model(model_name, **args)
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(0)
    batch = 2
    counts = []
    for steps in (2, 4):
        images = torch.zeros(steps * batch, 3, 32, 32, dtype=torch.uint8)
        labels = torch.zeros(steps * batch, dtype=torch.int64)
        counter = _OpCounter()
        with counter:
            train_epoch(model, optimizer, images, labels, batch, generator, fast_path.precision,
                        augment=settings["augment"], channels_last=fast_path.channels_last)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 2


def run_gpu_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Estimate the GPU time of every run of the study from its FLOPs and operator count per step.

    A step takes the longer of two times: its FLOPs at ``--gpu-share`` of the
    GPU's peak, and its dispatched operators at ``--op-overhead-us`` each,
    the host-side cost that bounds small models in eager mode. Evaluation
    adds the forward FLOPs of the validation set every epoch and of the test
    set once. Runs with early stopping are taken to last ``--early-stop-epochs``
    epochs, capped at their maximum. Besides the one-at-a-time total it gives
    a lower bound on the wall time of ``--jobs`` runs sharing the GPU.
    """
    from cifar_study.config import build_study

    study = build_study(read_study_config(args.config))
    achieved = args.gpu_peak_tflops * 1e12 * args.gpu_share
    val_images, test_images = 5_000, 10_000
    counts: dict[str, tuple[int, int, float]] = {}
    runs = []
    for run in study.runs.values():
        settings = run.settings
        batch = settings["batch_size"]
        arguments = model_args(run.model, settings)
        # Runs that differ only in training hyperparameters share their counts.
        key = json.dumps([run.model, arguments, settings["optimizer"], batch], sort_keys=True)
        if key not in counts:
            counts[key] = (*count_train_flops(run.model, arguments, batch), count_step_ops(run.model, arguments, settings))
        train_flops, forward_flops, ops = counts[key]
        epochs = settings["epochs"]
        if settings["early_stopping_patience"] is not None:
            epochs = min(epochs, args.early_stop_epochs)
        steps = math.ceil(FULL_EPOCH_IMAGES / batch)
        compute_s = train_flops / achieved
        host_s = ops * args.op_overhead_us / 1e6
        step_s = max(compute_s, host_s)
        eval_s = forward_flops / batch * (val_images * epochs + test_images) / achieved
        seconds = steps * epochs * step_s + eval_s + args.job_overhead_s
        runs.append({
            "run_id": run.run_id, "model": run.model, "epochs": epochs, "gflops_per_step": train_flops / 1e9,
            "ops_per_step": ops, "compute_ms": compute_s * 1e3, "host_ms": host_s * 1e3,
            "step_ms": step_s * 1e3, "gpu_seconds": steps * epochs * compute_s + eval_s, "seconds": seconds,
        })
    total = sum(r["seconds"] for r in runs)

    # With --jobs runs sharing the GPU, each job's host work and start-up run
    # on CPU cores of their own, but the GPU's compute is still done one
    # kernel stream after another. The wall time is then at least the summed
    # GPU compute and at least the serial total spread over the jobs.
    gpu_total = sum(r["gpu_seconds"] for r in runs)
    shared_wall = max(gpu_total, total / args.jobs)
    result = {"runs": runs, "total_hours": total / 3600, "gpu_compute_hours": gpu_total / 3600,
              "shared_wall_hours": shared_wall / 3600, "assumptions": {
                  "gpu_peak_tflops": args.gpu_peak_tflops, "gpu_share": args.gpu_share,
                  "op_overhead_us": args.op_overhead_us, "early_stop_epochs": args.early_stop_epochs,
                  "job_overhead_s": args.job_overhead_s, "jobs": args.jobs}}
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(r["run_id"]) for r in runs) + 2
        print(f"{'run':<{width}}{'epochs':>7}{'GFLOP/step':>12}{'ops/step':>10}{'compute ms':>12}"
              f"{'host ms':>9}{'minutes':>9}")
        for r in runs:
            print(f"{r['run_id']:<{width}}{r['epochs']:>7}{r['gflops_per_step']:>12.1f}{r['ops_per_step']:>10.0f}"
                  f"{r['compute_ms']:>12.2f}{r['host_ms']:>9.2f}{r['seconds'] / 60:>9.1f}")
        print(f"total: {total / 60:.1f} minutes for {len(runs)} runs one at a time, {gpu_total / 60:.1f} of them "
              f"GPU compute; {shared_wall / 60:.1f} minutes with {args.jobs} jobs sharing the GPU (an estimate; "
              f"{args.gpu_share:.0%} of {args.gpu_peak_tflops:.0f} TFLOP/s, {args.op_overhead_us:g} us per operator)")
    return result


# Compare runs ---------------------------------------------------------------


def _fraction_or_none(value: Any) -> bool:
    """Return whether ``value`` is an accuracy as run.json writes it: a fraction in [0, 1], or null."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_run_summary(summary: Any) -> str | None:
    """Return what makes ``summary`` an invalid run.json for the comparison, or None."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    for key in ("run_id", "model", "precision"):
        if not isinstance(summary.get(key), str):
            return f"{key} is {summary.get(key)!r}, expected a string"
    for key in ("best_val_acc", "test_acc"):
        if key not in summary:
            return f"missing {key}"
        if not _fraction_or_none(summary[key]):
            return f"{key} is {summary[key]!r}, expected a fraction from 0 to 1 or null"
    return None


def read_run_summaries(runs_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Return the run.json of every run in ``runs_dir``, by run id, after checking the keys the comparison reads."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise FileNotFoundError(f"runs folder {str(runs_dir)!r} not found; pass the results/runs folder of a finished study")
    if not runs_dir.is_dir():
        raise ValueError(f"{str(runs_dir)!r} is not a folder; pass the results/runs folder of a finished study")
    paths = sorted(runs_dir.glob("*/run.json"))
    if not paths:
        raise ValueError(f"{str(runs_dir)!r} contains no <run-id>/run.json; pass the results/runs folder of a finished study")

    summaries: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}
    for path in paths:
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a valid run.json ({error}); rerun that run or remove its folder") from None
        problem = _check_run_summary(summary)
        if problem:
            raise ValueError(f"{path} is not a valid run.json ({problem}); rerun that run or remove its folder")
        run_id = summary["run_id"]
        if run_id in summaries:
            raise ValueError(f"run id {run_id!r} is in both {folders[run_id]} and {path.parent}; remove one of them")
        summaries[run_id], folders[run_id] = summary, path.parent
    return summaries


def _difference_summary(values: list[float]) -> dict[str, float | None]:
    """Return the mean, standard error, min and max of ``values``, each None where it is undefined."""
    if not values:
        return {"mean": None, "standard_error": None, "min": None, "max": None}
    standard_error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "standard_error": standard_error, "min": min(values), "max": max(values)}


def _format_difference(name: str, diff: dict[str, float | None]) -> str:
    if diff["mean"] is None:
        return f"{name} n/a"
    error = f"{diff['standard_error']:.1f}" if diff["standard_error"] is not None else "n/a"
    return f"{name} {diff['mean']:+.1f} +- {error} ({diff['min']:+.1f} to {diff['max']:+.1f})"


def run_compare_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    first, second = (read_run_summaries(folder) for folder in args.runs)
    common = sorted(set(first) & set(second))
    if not common:
        raise ValueError(f"no run id is in both {args.runs[0]!r} and {args.runs[1]!r}; pass two runs folders of the same config")
    for run_id in common:
        if first[run_id]["model"] != second[run_id]["model"]:
            raise ValueError(f"run {run_id!r} trained {first[run_id]['model']} in the first folder and "
                             f"{second[run_id]['model']} in the second; pass two runs folders of the same config")

    rows = []
    for run_id in common:
        first_run, second_run = first[run_id], second[run_id]
        row = {
            "run_id": run_id,
            "model": first_run["model"],
            "precision": [first_run["precision"], second_run["precision"]],
            "best_val_acc": [first_run["best_val_acc"], second_run["best_val_acc"]],
            "test_acc": [first_run["test_acc"], second_run["test_acc"]],
        }
        # A run with no best epoch (it diverged at once) has null accuracies and no difference.
        for key, name in (("best_val_acc", "val_diff_points"), ("test_acc", "test_diff_points")):
            values = row[key]
            row[name] = 100 * (values[0] - values[1]) if None not in values else None
        rows.append(row)

    summaries = []
    for model in sorted({row["model"] for row in rows}):
        model_rows = [row for row in rows if row["model"] == model]
        summary = {"model": model, "runs": len(model_rows)}
        for key in ("val_diff_points", "test_diff_points"):
            summary[key] = _difference_summary([row[key] for row in model_rows if row[key] is not None])
        summaries.append(summary)
    counts = {"runs_in_both": len(common), "first_only": len(set(first) - set(second)),
              "second_only": len(set(second) - set(first))}

    if args.json:
        for row in [*rows, *summaries, counts]:
            print(json.dumps(row), flush=True)
        return rows + summaries

    print(f"first: {args.runs[0]}\nsecond: {args.runs[1]}\n{counts['runs_in_both']} runs in both "
          f"(first only: {counts['first_only']}, second only: {counts['second_only']})")
    width = max(len(run_id) for run_id in common) + 2
    print(f"{'run':<{width}}{'precision':>12}{'best val_acc %':>17}{'test_acc %':>14}")
    for row in rows:
        precision = "/".join(row["precision"])
        val = "/".join("n/a" if v is None else f"{100 * v:.1f}" for v in row["best_val_acc"])
        test = "/".join("n/a" if v is None else f"{100 * v:.1f}" for v in row["test_acc"])
        print(f"{row['run_id']:<{width}}{precision:>12}{val:>17}{test:>14}")
    print("first minus second, in points: mean +- standard error (min to max)")
    for summary in summaries:
        cells = [_format_difference("val", summary["val_diff_points"]),
                 _format_difference("test", summary["test_diff_points"])]
        runs = f"{summary['runs']} run" + ("s" if summary["runs"] != 1 else "")
        print(f"  {summary['model']:<10}{runs:>8}  " + "   ".join(cells))
    return rows + summaries


# Profile --------------------------------------------------------------------

# Operator groups of the profile, tried in order: an operator joins the first
# group with a pattern in its name. Groups add up self time, so a composite
# operator (aten::linear, aten::convolution) and the kernels it calls count once.
OPERATOR_GROUPS = (
    # The engine takes the norms with _foreach_norm, or with dot products for fp32 gradients on the CPU.
    ("gradient norms", ("_foreach_norm", "linalg_vector_norm", "aten::dot")),
    ("matmul and convolution", ("conv", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("normalisation", ("batch_norm", "layer_norm")),
    ("activations", ("relu", "threshold_backward", "gelu", "sigmoid", "tanh", "clamp_min")),
    ("optimizer", ("adam", "sgd", "Optimizer")),
    ("augmentation", ("grid_sampler", "index_select", "aten::flip", "aten::where")),
    ("copies and casts", ("copy_", "_to_copy", "clone", "contiguous")),
)


def operator_group(name: str) -> str:
    """Return the group of the profiled operator ``name``, or "other"."""
    for group, patterns in OPERATOR_GROUPS:
        if any(pattern in name for pattern in patterns):
            return group
    return "other"


def run_profile(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    steps = args.steps or 10
    rows = []
    for device in _devices(args.device):
        sizes = tuple(args.matmul_sizes) if args.matmul_sizes else MATMUL_SIZES[device.type]
        for model_name in args.models:
            setup = speed_setup(args, model_name, device)
            settings, fast_path, batch_size = setup.settings, setup.fast_path, setup.batch_size
            needed = (args.warmup + steps) * batch_size
            if needed > FULL_EPOCH_IMAGES:
                raise ValueError(f"profiling {steps} steps after {args.warmup} warm-up steps of {batch_size} "
                                 f"images needs {needed} images, over the {FULL_EPOCH_IMAGES} of the training split; "
                                 f"lower --steps or --batch-size")
            data = load_images(args.data, args.root, needed)
            images, labels = data["train_images"].to(device), data["train_labels"].to(device)
            torch.manual_seed(settings["seed"])
            model, step_model = place_model(build_model(model_name, **model_args(model_name, settings)), device, fast_path)
            optimizer = make_optimizer(model, settings)
            generator = torch.Generator(device=device).manual_seed(settings["seed"])
            warm = args.warmup * batch_size
            _pipeline_block(setup, step_model, optimizer, images[:warm], labels[:warm], generator, True)

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as profiler:
                seconds = _pipeline_block(setup, step_model, optimizer, images[warm:], labels[warm:],
                                          generator, True)
            # On CUDA the kernels' device time is what bounds the step; on the CPU it is the operators' own time.
            # NOTE: the CUDA branch has not run on a GPU yet, so its grouping of kernel time is unchecked.
            attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            groups = {group: 0.0 for group, _ in OPERATOR_GROUPS} | {"other": 0.0}
            for event in profiler.key_averages():
                groups[operator_group(event.key)] += getattr(event, attribute) / 1e6
            total = sum(groups.values())

            flops = setup.flops_per_step
            peak = max(matmul_throughput(device, fast_path.precision, sizes, 3).values())
            kernel_seconds = groups["matmul and convolution"]
            row = {
                "model": model_name,
                "device": device.type,
                "precision": fast_path.precision,
                "channels_last": fast_path.channels_last,
                "compile": fast_path.compile,
                "batch_size": batch_size,
                "steps": steps,
                "step_seconds": seconds / steps,
                "group_shares": {group: value / total for group, value in groups.items()},
                "kernel_flop_per_s": flops * steps / kernel_seconds if kernel_seconds else None,
                "matmul_flop_per_s": peak,
                "kernel_matmul_share": flops * steps / kernel_seconds / peak if kernel_seconds else None,
                "step_matmul_share": flops * steps / seconds / peak,
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                _print_profile(device, row)
    return rows


def _print_profile(device: torch.device, row: dict[str, Any]) -> None:
    print(f"\n{row['model']} on {describe_device(device)}, {row['precision']}, {row['steps']} steps of "
          f"{row['step_seconds'] * 1e3:.1f} ms (under the profiler)")
    for group, share in sorted(row["group_shares"].items(), key=lambda item: -item[1]):
        print(f"  {group:<24}{share:>7.1%}")
    if row["kernel_flop_per_s"] is None:
        print("no matmul or convolution operator was profiled")
        return
    print(f"matmul and convolution kernels: {row['kernel_flop_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{row['kernel_matmul_share']:.0%} of the {row['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s square matmul; "
          f"whole step {row['step_matmul_share']:.0%}")


# Command line ----------------------------------------------------------------


def _number_type(convert, low: float, inclusive: bool, description: str):
    """Return an argparse type that converts a value and rejects it if it is not finite, below ``low``, or equal to ``low`` without ``inclusive``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < low or (value == low and not inclusive) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number_type(int, 1, True, "a positive integer")
POSITIVE_FLOAT = _number_type(float, 0.0, False, "a positive number")
NON_NEGATIVE_FLOAT = _number_type(float, 0.0, True, "a number of 0 or more")


def _share(text: str) -> float:
    value = POSITIVE_FLOAT(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the training fast path of cifar_study against a tutorial-style loop.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Modes:", 1)[1],
    )
    parser.add_argument("mode", nargs="?", default="speed", choices=MODES, help="what to measure (default: speed)")
    parser.add_argument("--data", help="prepared data file (results/data/cifar10.pt)")
    parser.add_argument("--root", help="CIFAR-10 image folder with train/<class>/*.jpg, used when --data is not given")
    parser.add_argument("--config", default="config.yaml", help="study config whose defaults set the runs (default: config.yaml)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to measure (default: all)")
    parser.add_argument("--device", nargs="+", help="devices to measure on (default: the CPU, and CUDA when present)")
    parser.add_argument("--threads", type=POSITIVE_INT, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of tables")

    speed = parser.add_argument_group(
        "speed", "profile takes --steps, --batch-size, --warmup, --precision, --channels-last, --compile and "
                 "--matmul-sizes too")
    speed.add_argument("--images", type=POSITIVE_INT, default=5120,
                       help="real training images to load; longer timed blocks pass over them again (default: 5120)")
    speed.add_argument("--steps", type=POSITIVE_INT, help="timed training steps per repeat (default: set by --block-seconds; profile: 10)")
    speed.add_argument("--block-seconds", type=POSITIVE_FLOAT, default=4.0,
                       help=f"target length of a timed block, at least {MIN_STEPS} steps, when --steps is not given "
                            f"(default: 4)")
    speed.add_argument("--batch-size", type=POSITIVE_INT, help="images per step (default: the config's batch_size, 128)")
    # The reference loop's warm-up steps also absorb its loader workers' start.
    speed.add_argument("--warmup", type=POSITIVE_INT, default=2, help="untimed steps before each measurement (default: 2)")
    speed.add_argument("--repeats", type=POSITIVE_INT, default=5, help="repeats whose median is reported (default: 5)")
    speed.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="override the config's precision setting")
    speed.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                       help="override the fast path's memory format (default: auto, the pipeline's choice)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the pipeline's model")
    speed.add_argument("--matmul-sizes", type=POSITIVE_INT, nargs="+", help="matmul sizes (default: 2048 4096 on CPU, 4096 8192 on CUDA)")

    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--preset", choices=list(ACCURACY_PRESETS), default="quick",
                          help="subset size and epochs: " + "; ".join(
                              f"{k}: {v['train_images']} train, {v['val_images']} val, {v['epochs']} epochs"
                              for k, v in ACCURACY_PRESETS.items()))
    accuracy.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (default: 42)")

    compare = parser.add_argument_group("compare-runs")
    compare.add_argument("--runs", nargs=2, metavar=("FIRST", "SECOND"),
                         help="two results/runs folders whose runs are paired by run id")

    estimate = parser.add_argument_group("gpu-estimate")
    estimate.add_argument("--gpu-peak-tflops", type=POSITIVE_FLOAT, default=989.0,
                          help="dense bf16 peak of the GPU in TFLOP/s (default: 989, H100/H200 SXM)")
    estimate.add_argument("--gpu-share", type=_share, default=0.10,
                          help="assumed share of the peak that matmuls and convolutions reach at batch 128 (default: 0.10)")
    estimate.add_argument("--op-overhead-us", type=NON_NEGATIVE_FLOAT, default=8.0,
                          help="assumed host time per dispatched operator in eager mode, in microseconds (default: 8)")
    estimate.add_argument("--early-stop-epochs", type=POSITIVE_INT, default=100,
                          help="epochs assumed for runs with early stopping (default: 100, their cap)")
    estimate.add_argument("--job-overhead-s", type=NON_NEGATIVE_FLOAT, default=15.0,
                          help="assumed seconds per job for start-up, CUDA initialisation and writing files (default: 15)")
    estimate.add_argument("--jobs", type=POSITIVE_INT, default=1,
                          help="training jobs sharing the one GPU, as with --resources gpu=N on a one-GPU machine "
                               "(default: 1)")

    # Arguments of the startup probe that ``overheads`` runs in a fresh process.
    parser.add_argument("--probe-model", default="resnet18", help=argparse.SUPPRESS)
    parser.add_argument("--imported-at", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "compare-runs" and not args.runs:
        parser.error("compare-runs needs --runs FIRST SECOND, two results/runs folders")
    if args.data is None and args.root is None and args.mode in ("speed", "accuracy", "profile"):
        default = Path("results/data/cifar10.pt")
        if default.is_file():
            args.data = str(default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.mode == "speed":
            run_speed(args)
        elif args.mode == "overheads":
            run_overheads(args)
        elif args.mode == "accuracy":
            run_accuracy(args)
        elif args.mode == "compare-runs":
            run_compare_runs(args)
        elif args.mode == "profile":
            run_profile(args)
        elif args.mode == "gpu-estimate":
            run_gpu_estimate(args)
        else:
            startup_probe(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"bench {args.mode} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
