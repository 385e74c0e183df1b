"""The training loop's bookkeeping and batched augmentation, checked against plain computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cifar_study.augment import random_flip_crop
from cifar_study.data import load_prepared
from cifar_study.engine import _flat_view, accumulate_grad_norms, prepare_batch, train_epoch
from cifar_study.models import build_model
from cifar_study.train import make_optimizer

torch.set_num_threads(1)

SMALL_MODELS = {
    "mlp": {"hidden_sizes": [64, 32]},
    "resnet18": {"widths": [8, 16, 16, 16], "blocks": [1, 1, 1, 1]},
    "mlpmixer": {"patch_size": 8, "embed_dim": 32, "num_blocks": 2},
}
OPTIMIZER = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "momentum": 0.9}


def naive_grad_norms(model, optimizer, images, labels, batch_size, generator):
    """Train one epoch as train_epoch does, reading each gradient's norm on the host after every step."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    per_step = []
    for first in range(0, len(labels), batch_size):
        index = order[first : first + batch_size]
        inputs = prepare_batch(images[index], True, generator, False)
        loss = F.cross_entropy(model(inputs), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        per_step.append([p.grad.norm().item() for p in model.parameters()])
        optimizer.step()
    norms = torch.tensor(per_step, dtype=torch.float64)
    return norms.mean(dim=0), norms.max(dim=0).values


@pytest.mark.parametrize("name, channels_last", [(name, False) for name in SMALL_MODELS] + [("resnet18", True)])
def test_grad_norms_match_naive(name, channels_last, prepared_small):
    data = load_prepared(prepared_small)
    images, labels = data["train_images"][:40], data["train_labels"][:40]
    torch.manual_seed(0)
    model = build_model(name, **SMALL_MODELS[name])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    naive_model = copy.deepcopy(model)

    stats = train_epoch(model, make_optimizer(model, OPTIMIZER), images, labels, 16,
                        torch.Generator().manual_seed(1), "fp32", channels_last=channels_last)
    mean, maximum = naive_grad_norms(naive_model, make_optimizer(naive_model, OPTIMIZER), images, labels, 16,
                                     torch.Generator().manual_seed(1))

    assert len(stats.grad_norm_mean) == len(list(model.parameters()))
    torch.testing.assert_close(torch.tensor(stats.grad_norm_mean, dtype=torch.float64), mean, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(stats.grad_norm_max, dtype=torch.float64), maximum, rtol=1e-4, atol=1e-7)


def test_flat_view_shares_memory():
    grad = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    flat = _flat_view(grad)
    assert flat.data_ptr() == grad.data_ptr()
    assert torch.equal(flat.sort().values, grad.reshape(-1).sort().values)


def test_missing_gradient_counts_as_zero():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    (4 * used).sum().backward()
    norm_sum, norm_max = torch.zeros(2), torch.zeros(2)
    accumulate_grad_norms([used, unused], norm_sum, norm_max)
    accumulate_grad_norms([used, unused], norm_sum, norm_max)
    # The gradient of 4 * used is 4 in each of three elements: norm 4 * sqrt(3).
    torch.testing.assert_close(norm_sum, torch.tensor([8 * 3**0.5, 0.0]))
    torch.testing.assert_close(norm_max, torch.tensor([4 * 3**0.5, 0.0]))


@pytest.mark.parametrize("dtype, value", [(torch.float64, 1e25), (torch.float64, 1e-25), (torch.float16, 300.0)])
def test_grad_norms_outside_float32_squares(dtype, value):
    # Each squared norm is outside the range of float32 (of float16 for 300), while the norm itself is inside it.
    param = torch.zeros(100, dtype=dtype, requires_grad=True)
    param.grad = torch.full((100,), value, dtype=dtype)
    norm_sum, norm_max = torch.zeros(1), torch.zeros(1)
    accumulate_grad_norms([param], norm_sum, norm_max)
    torch.testing.assert_close(norm_sum, torch.tensor([10 * value]), rtol=1e-3, atol=0)


def test_grad_norm_of_complex_gradient():
    param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    param.grad = torch.tensor([1 + 1j, 2 - 1j, 3j], dtype=torch.complex64)
    norm_sum, norm_max = torch.zeros(1), torch.zeros(1)
    accumulate_grad_norms([param], norm_sum, norm_max)
    torch.testing.assert_close(norm_sum, torch.tensor([4.0]))


def test_grad_norm_tracking_off_returns_none(prepared_small):
    data = load_prepared(prepared_small)
    model = build_model("mlp", **SMALL_MODELS["mlp"])
    stats = train_epoch(model, make_optimizer(model, OPTIMIZER), data["train_images"][:16], data["train_labels"][:16],
                        16, torch.Generator().manual_seed(0), "fp32", track_grad_norms=False)
    assert stats.grad_norm_mean is None
    assert stats.grad_norm_max is None


def test_flip_crop_matches_affine_grid():
    # The same random draws, replayed through F.affine_grid, must give the same images.
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = random_flip_crop(images, torch.Generator().manual_seed(5))

    replay = torch.Generator().manual_seed(5)
    draws = [torch.rand(8, generator=replay) for _ in range(5)]
    area = draws[0] * 0.2 + 0.8
    log_low, log_high = torch.log(torch.tensor(0.9)), torch.log(torch.tensor(1.1))
    ratio = torch.exp(draws[1] * (log_high - log_low) + log_low)
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    theta = torch.zeros(8, 2, 3)
    theta[:, 0, 0] = crop_w * torch.where(draws[4] < 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (draws[2] * 2 - 1) * (1 - crop_w)
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = (draws[3] * 2 - 1) * (1 - crop_h)
    grid = F.affine_grid(theta, (8, 3, 32, 32), align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


def test_flip_crop_keeps_shape_and_range():
    images = torch.rand(4, 3, 32, 32)
    result = random_flip_crop(images, torch.Generator().manual_seed(0))
    assert result.shape == images.shape
    assert result.min() >= 0.0
    assert result.max() <= 1.0
