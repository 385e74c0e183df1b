"""A training loop of the kind most PyTorch tutorials write, as a baseline for the fast path.

A Dataset serves in-memory images as PIL images through torchvision
transforms, the way ``torchvision.datasets.CIFAR10`` does, and a DataLoader
with two worker processes batches them. The model trains in fp32 with
AdamW's default per-parameter loop, and every step waits on the host for
the loss, the accuracy and each parameter's gradient norm. It computes the
same quantities as ``engine.train_epoch``, with the same augmentation and
normalisation, so the benchmark compares two ways of doing the same work.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

from cifar_study.augment import CROP_RATIO, CROP_SCALE
from cifar_study.data import MEAN, STD

NUM_WORKERS = 2


class PILImageDataset(Dataset):
    """Dataset of images kept as one uint8 HWC array and returned as transformed PIL images with int labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: transforms.Compose):
        # (N, 3, H, W) -> (N, H, W, 3), the layout of torchvision's CIFAR10.data.
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(np.asarray(self.images[index]))
        return self.transform(image), self.labels[index]


def train_transform() -> transforms.Compose:
    """Return the study's training augmentation as torchvision transforms on PIL images."""
    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomResizedCrop(32, scale=CROP_SCALE, ratio=CROP_RATIO),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def eval_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    train: bool,
    seed: int,
    num_samples: int | None = None,
) -> DataLoader:
    """Build a DataLoader over ``images`` (uint8, on the CPU) with two workers.

    Training loaders shuffle and augment; ``num_samples`` makes a training
    loader draw that many images (several shuffled passes), so that one
    iterator serves a whole benchmark. Pinned memory is used on CUDA only.
    """
    dataset = PILImageDataset(images.cpu(), labels.cpu(), train_transform() if train else eval_transform())
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=num_samples, generator=generator) if train else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=NUM_WORKERS,
        pin_memory=device.type == "cuda", generator=generator,
    )


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Return AdamW with torch's default implementation (no ``fused`` or ``foreach`` request)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> tuple[float, int, dict[str, float]]:
    """Run one fp32 training step and return the loss, the correct count and each parameter's gradient norm."""
    images, targets = images.to(device), targets.to(device)
    logits = model(images)
    loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad()
    loss.backward()
    grad_norms = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.item(), (logits.argmax(dim=1) == targets).sum().item(), grad_norms


def train_batches(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, device: torch.device, steps: int
) -> tuple[float, float]:
    """Train on the next ``steps`` batches of ``batches`` and return the mean loss and the accuracy."""
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for _ in range(steps):
        images, targets = next(batches)
        loss, batch_correct, _ = train_step(model, optimizer, images, targets, device)
        loss_sum += loss * len(targets)
        correct += batch_correct
        count += len(targets)
    return loss_sum / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` over ``loader``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return loss_sum / max(count, 1), correct / max(count, 1)
