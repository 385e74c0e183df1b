"""Read CIFAR-10 once and write the decoded images and the train/validation split.

The source is either the torchvision archive (``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz`` under the data root, downloaded when allowed) or an
image folder with ``train/<class>/*`` and ``test/<class>/*``. The output,
``cifar10.pt``, holds uint8 tensors of shape (N, 3, 32, 32) and int64 labels
for the train, validation and test splits, plus the indices of the train and
validation images in the source's 50,000 training images. Training jobs load
this file and never decode or download anything.

    python -m cifar_study.data --root /data/cifar10 --out results/data
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifar_study.io import torch_load, torch_save, write_json

log = logging.getLogger("cifar_study.data")

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
TRAIN_SOURCE_SIZE = 50_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

# Channel statistics of the CIFAR-10 training set, on the [0, 1] scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# Seconds to wait for the download server before giving up.
DOWNLOAD_TIMEOUT = 20


class DataError(RuntimeError):
    """Missing or invalid CIFAR-10 data; the message names the path and the fix."""


def missing_data_message(root: Path, reason: str) -> str:
    return (
        f"CIFAR-10 not found in data root {str(root)!r} ({reason}). Provide it in one of two ways:\n"
        f"  1. the torchvision archive: set `data: {{download: true}}` on a machine with internet access, "
        f"or place cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {str(root)!r};\n"
        f"  2. an image folder: {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg "
        f"with the classes {', '.join(CLASSES)}.\n"
        f"Point the pipeline at another folder with `--config data='{{root: /path/to/cifar10}}'`."
    )


def detect_source(root: Path) -> str | None:
    """Return "image_folder", "torchvision" or None for what ``root`` contains."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "image_folder"
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file():
        return "torchvision"
    return None


def _decode_files(paths: list[Path]) -> torch.Tensor:
    """Decode image files into a uint8 tensor (N, 3, 32, 32), naming any bad file."""
    import numpy as np
    from PIL import Image

    images = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise DataError(
                f"cannot decode image {str(path)!r}: {error}. Replace or remove the file, "
                f"or restore the data set from its archive."
            ) from error
        if pixels.shape != (32, 32, 3):
            raise DataError(
                f"image {str(path)!r} is {pixels.shape[1]}x{pixels.shape[0]}, but CIFAR-10 images are 32x32 RGB; "
                f"remove it or restore the data set from its archive"
            )
        images[i] = pixels
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def read_image_folder(root: Path) -> dict[str, torch.Tensor]:
    """Read ``train/<class>/*`` and ``test/<class>/*`` into uint8 tensors and labels."""
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        class_dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if tuple(class_dirs) != CLASSES:
            missing = sorted(set(CLASSES) - set(class_dirs))
            unknown = sorted(set(class_dirs) - set(CLASSES))
            raise DataError(
                f"image folder {str(folder)!r} has the wrong class folders "
                f"(missing: {missing or 'none'}, unknown: {unknown or 'none'}); "
                f"expected one folder per CIFAR-10 class: {', '.join(CLASSES)}"
            )

        paths, labels = [], []
        for label, name in enumerate(CLASSES):
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(
                f"class folder {folder / name} contains no .jpg or .png images; "
                f"restore the data set from its archive"
            )
            paths += files
            labels += [label] * len(files)
        log.info("decoding %d %s images from %s", len(paths), split, folder)
        splits[f"{split}_images"] = _decode_files(paths)
        splits[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return splits


def read_torchvision(root: Path, download: bool) -> dict[str, torch.Tensor]:
    """Read the torchvision CIFAR-10 archive, downloading it into ``root`` if allowed."""
    from torchvision.datasets import CIFAR10

    splits = {}
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        for split in ("train", "test"):
            dataset = CIFAR10(str(root), train=split == "train", download=download)
            # dataset.data is (N, 32, 32, 3) uint8 in HWC order.
            splits[f"{split}_images"] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
            splits[f"{split}_labels"] = torch.tensor(dataset.targets, dtype=torch.int64)
    except (OSError, RuntimeError) as error:
        raise DataError(missing_data_message(root, f"download failed: {error}")) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return splits


def split_train_val(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split training indices into disjoint train and validation sets, stratified by class.

    Each class gives ``val_size / 10`` validation images. The split depends on
    ``seed`` and the labels alone, so every run sees the same split.
    """
    num_classes = len(CLASSES)
    if val_size % num_classes:
        raise DataError(f"data.val_size={val_size} is not a multiple of {num_classes}; the split is stratified by class")
    per_class = val_size // num_classes
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in range(num_classes):
        indices = torch.nonzero(labels == label).flatten()
        if per_class >= len(indices):
            raise DataError(
                f"data.val_size={val_size} leaves no training images of class {CLASSES[label]!r} "
                f"({len(indices)} images); use a smaller val_size"
            )
        shuffled = indices[torch.randperm(len(indices), generator=generator)]
        val_parts.append(shuffled[:per_class])
        train_parts.append(shuffled[per_class:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def take_per_class(indices: torch.Tensor, labels: torch.Tensor, per_class: int | None, seed: int, name: str):
    """Return a deterministic subset of ``indices`` with ``per_class`` images of each class."""
    if per_class is None:
        return indices
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for label in range(len(CLASSES)):
        of_class = indices[labels[indices] == label]
        if per_class > len(of_class):
            raise DataError(
                f"data.subset.{name}={per_class} is more than the {len(of_class)} images of class "
                f"{CLASSES[label]!r} in that split; use at most {len(of_class)} or null for all"
            )
        parts.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    return torch.cat(parts).sort().values


def _digest(*tensors: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.contiguous().numpy().tobytes())
    return sha.hexdigest()


def prepare(
    root: str | Path,
    out_dir: str | Path,
    split_seed: int = 0,
    val_size: int = 5000,
    subset: dict[str, int | None] | None = None,
    download: bool = True,
) -> dict[str, Any]:
    """Decode CIFAR-10 from ``root`` and write ``cifar10.pt`` and ``cifar10.json`` to ``out_dir``.

    Raises DataError, naming the data root and both ways to provide the data,
    before any decoding when neither source is there.
    """
    root, out_dir = Path(root), Path(out_dir)
    subset = subset or {}
    start = time.perf_counter()

    source = detect_source(root) if root.is_dir() else None
    if source is None and not download:
        reason = "the folder does not exist" if not root.is_dir() else "it needs both train/ and test/, or the archive"
        raise DataError(missing_data_message(root, reason + ", and data.download is false"))
    if source == "image_folder":
        raw = read_image_folder(root)
    else:
        source = "torchvision"
        raw = read_torchvision(root, download=download)

    if len(raw["train_labels"]) != TRAIN_SOURCE_SIZE:
        log.warning("the source holds %d training images, not the %d of CIFAR-10", len(raw["train_labels"]), TRAIN_SOURCE_SIZE)

    train_idx, val_idx = split_train_val(raw["train_labels"], val_size, split_seed)
    labels = raw["train_labels"]
    train_idx = take_per_class(train_idx, labels, subset.get("train_per_class"), split_seed, "train_per_class")
    val_idx = take_per_class(val_idx, labels, subset.get("val_per_class"), split_seed, "val_per_class")
    test_idx = torch.arange(len(raw["test_labels"]))
    test_idx = take_per_class(test_idx, raw["test_labels"], subset.get("test_per_class"), split_seed, "test_per_class")

    prepared = {
        "train_images": raw["train_images"][train_idx].contiguous(),
        "train_labels": labels[train_idx].contiguous(),
        "val_images": raw["train_images"][val_idx].contiguous(),
        "val_labels": labels[val_idx].contiguous(),
        "test_images": raw["test_images"][test_idx].contiguous(),
        "test_labels": raw["test_labels"][test_idx].contiguous(),
        "train_index": train_idx,
        "val_index": val_idx,
        "test_index": test_idx,
        "classes": list(CLASSES),
    }
    summary = {
        "source": source,
        "root": str(root),
        "classes": list(CLASSES),
        "split_seed": split_seed,
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        "num_test": len(test_idx),
        "subset": subset,
        "sha256_images": _digest(prepared["train_images"], prepared["val_images"], prepared["test_images"]),
        "sha256_split": _digest(train_idx, val_idx),
    }

    # The tensors go first and the summary last, so a present cifar10.json
    # means the data file beside it is complete.
    torch_save(out_dir / "cifar10.pt", prepared)
    write_json(out_dir / "cifar10.json", summary)
    log.info(
        "prepared %d train, %d validation and %d test images from %s (%s) in %.1f s",
        summary["num_train"], summary["num_val"], summary["num_test"], root, source, time.perf_counter() - start,
    )
    return summary


def load_prepared(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``cifar10.pt`` onto ``device``, checking that it is a prepared CIFAR-10 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared data {str(path)!r} not found; run `snakemake results/data/cifar10.pt` first")
    data = torch_load(
        path, DataError, f"cannot load prepared data {path}; delete it and run the prepare_data rule again", device
    )
    for split in ("train", "val", "test"):
        images = data.get(f"{split}_images")
        if images is None or images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(
                f"prepared data {str(path)!r} has no valid {split}_images (uint8, N x 3 x 32 x 32); "
                f"delete it and run the prepare_data rule again"
            )
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode CIFAR-10 once and write the train/validation/test tensors.")
    parser.add_argument("--root", required=True, help="folder with the torchvision archive or train/ and test/ image folders")
    parser.add_argument("--out", required=True, help="output folder for cifar10.pt and cifar10.json")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images taken from the training set")
    parser.add_argument("--train-per-class", type=int, help="training images kept per class (default: all)")
    parser.add_argument("--val-per-class", type=int, help="validation images kept per class (default: all)")
    parser.add_argument("--test-per-class", type=int, help="test images kept per class (default: all)")
    parser.add_argument("--no-download", action="store_true", help="never download the torchvision archive")
    parser.add_argument("--log", help="also append log lines to this file")
    args = parser.parse_args(argv)

    handlers = [logging.StreamHandler()]
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers)

    subset = {
        "train_per_class": args.train_per_class,
        "val_per_class": args.val_per_class,
        "test_per_class": args.test_per_class,
    }
    try:
        prepare(args.root, args.out, args.split_seed, args.val_size, subset, download=not args.no_download)
    except DataError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
