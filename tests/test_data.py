"""Data preparation on the real CIFAR-10 images: split, subsets and bad input."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from cifar_study.data import CLASSES, DataError, load_prepared, prepare, split_train_val


@pytest.fixture
def small_folder(tmp_path, cifar_root) -> Path:
    """Copy 4 real training and 2 real test images per class into an image folder."""
    root = tmp_path / "cifar_small"
    for split, count in (("train", 4), ("test", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for path in sorted((cifar_root / split / name).iterdir())[:count]:
                shutil.copy(path, root / split / name / path.name)
    return root


def test_full_split_sizes(prepared_full):
    data = torch.load(prepared_full, weights_only=True)
    assert len(data["train_labels"]) == 45_000
    assert len(data["val_labels"]) == 5_000
    assert len(data["test_labels"]) == 10_000


def test_split_is_disjoint(prepared_full):
    data = torch.load(prepared_full, weights_only=True)
    train, val = set(data["train_index"].tolist()), set(data["val_index"].tolist())
    assert not train & val
    assert len(train | val) == 50_000


def test_split_is_stratified(prepared_full):
    data = torch.load(prepared_full, weights_only=True)
    assert torch.bincount(data["val_labels"]).tolist() == [500] * 10


def test_split_depends_on_seed_only():
    labels = torch.arange(1000) % 10
    first = split_train_val(labels, 100, seed=3)
    second = split_train_val(labels, 100, seed=3)
    other = split_train_val(labels, 100, seed=4)
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_prepared_images_are_uint8(prepared_full):
    data = load_prepared(prepared_full)
    assert data["train_images"].dtype == torch.uint8
    assert tuple(data["train_images"].shape[1:]) == (3, 32, 32)
    assert data["classes"] == list(CLASSES)


def test_subset_has_equal_classes(prepared_small):
    data = torch.load(prepared_small, weights_only=True)
    assert torch.bincount(data["train_labels"]).tolist() == [30] * 10
    assert torch.bincount(data["val_labels"]).tolist() == [10] * 10
    assert torch.bincount(data["test_labels"]).tolist() == [10] * 10


def test_subset_is_deterministic(tmp_path, cifar_root, prepared_small):
    prepare(cifar_root, tmp_path, subset={"train_per_class": 30, "val_per_class": 10, "test_per_class": 10}, download=False)
    again = torch.load(tmp_path / "cifar10.pt", weights_only=True)
    first = torch.load(prepared_small, weights_only=True)
    assert torch.equal(again["train_index"], first["train_index"])
    assert torch.equal(again["train_images"], first["train_images"])


def test_subset_draws_from_train_split(prepared_small, prepared_full):
    small = torch.load(prepared_small, weights_only=True)
    full = torch.load(prepared_full, weights_only=True)
    assert set(small["train_index"].tolist()) <= set(full["train_index"].tolist())
    assert set(small["val_index"].tolist()) <= set(full["val_index"].tolist())


def test_missing_data_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        prepare(tmp_path / "nowhere", tmp_path / "out", download=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert "torchvision archive" in message
    assert "image folder" in message
    assert time.monotonic() - start < 5
    assert not (tmp_path / "out" / "cifar10.pt").exists()


def test_failed_download_names_both_ways(tmp_path):
    # No network reaches the CIFAR-10 server from the test machines, so the
    # download fails; where it can reach it, the archive is fetched instead.
    with pytest.raises(DataError) as error:
        prepare(tmp_path / "empty", tmp_path / "out", download=True)
    assert "download failed" in str(error.value)
    assert "image folder" in str(error.value)


def test_corrupt_image_is_named(small_folder, tmp_path):
    bad = sorted((small_folder / "train" / "cat").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError) as error:
        prepare(small_folder, tmp_path / "out", val_size=10, download=False)
    assert str(bad) in str(error.value)
    assert not (tmp_path / "out" / "cifar10.pt").exists()


def test_wrong_image_size_is_named(small_folder, tmp_path):
    from PIL import Image

    bad = small_folder / "test" / "dog" / "big.png"
    Image.new("RGB", (64, 64)).save(bad)
    with pytest.raises(DataError, match="big.png.*32x32"):
        prepare(small_folder, tmp_path / "out", val_size=10, download=False)


def test_missing_class_folder_is_named(small_folder, tmp_path):
    shutil.rmtree(small_folder / "train" / "frog")
    with pytest.raises(DataError, match="missing: \\['frog'\\]"):
        prepare(small_folder, tmp_path / "out", val_size=10, download=False)


def test_oversized_subset_is_rejected(small_folder, tmp_path):
    with pytest.raises(DataError, match="train_per_class=50"):
        prepare(small_folder, tmp_path / "out", val_size=10, subset={"train_per_class": 50}, download=False)


def test_damaged_prepared_file_is_named(tmp_path):
    path = tmp_path / "cifar10.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="run the prepare_data rule again"):
        load_prepared(path)
