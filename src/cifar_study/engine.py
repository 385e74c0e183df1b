"""One epoch of training and one pass of evaluation, on data held on the device.

Loss sums, correct counts and per-parameter gradient norms accumulate in
device tensors and reach the host once per epoch, so no step waits on a
host sync.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_study.augment import normalize, random_flip_crop


@dataclass
class EpochStats:
    loss: float
    acc: float
    seconds: float
    grad_norm_mean: list[float] | None = None
    grad_norm_max: list[float] | None = None


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_batch(images: torch.Tensor, augment: bool, generator: torch.Generator | None, channels_last: bool):
    """Turn a uint8 batch into the normalised float input of the model."""
    batch = normalize(images)
    if augment:
        batch = random_flip_crop(batch, generator)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int):
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty()

    def update(self, step: int) -> None:
        if not self.enabled or (step % 10 and step != self.total):
            return
        width = 30
        filled = width * step // self.total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    precision: str,
    augment: bool = True,
    channels_last: bool = False,
    track_grad_norms: bool = True,
    progress_label: str = "train",
) -> EpochStats:
    """Train ``model`` for one epoch over a random permutation of the images.

    The last incomplete batch is kept, so every image is seen once per epoch.
    Gradient norms are the L2 norm of each parameter's gradient at every step;
    the mean and max over the epoch's steps are returned in
    ``model.named_parameters()`` order.
    """
    device = images.device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_images = len(labels)
    order = torch.randperm(num_images, device=device, generator=generator)
    steps = (num_images + batch_size - 1) // batch_size

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    norm_sum = torch.zeros(len(params), device=device)
    norm_max = torch.zeros(len(params), device=device)
    progress = ProgressBar(progress_label, steps)

    start = _synchronized_time(device)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        # index_select, unlike images[index], has a fast kernel for uint8 on the CPU.
        inputs = prepare_batch(images.index_select(0, index), augment, generator, channels_last)
        targets = labels.index_select(0, index)

        with autocast_context(device, precision):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if track_grad_norms:
            accumulate_grad_norms(params, norm_sum, norm_max)
        optimizer.step()

        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(dim=1) == targets).sum()
        progress.update(step + 1)
    seconds = _synchronized_time(device) - start
    progress.close()

    # The one host sync of the epoch.
    loss_value = loss_sum.item() / num_images
    stats = EpochStats(loss=loss_value, acc=correct.item() / num_images, seconds=seconds)
    if track_grad_norms:
        stats.grad_norm_mean = (norm_sum / steps).tolist()
        stats.grad_norm_max = norm_max.tolist()
    return stats


def accumulate_grad_norms(params: list[torch.Tensor], norm_sum: torch.Tensor, norm_max: torch.Tensor) -> None:
    """Add each parameter's gradient L2 norm to ``norm_sum`` and raise ``norm_max`` to it, in place.

    Nothing leaves the device. A parameter without a gradient counts as norm 0.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dense_fp32 = all(grad.dtype == torch.float32 and grad.layout == torch.strided for grad in grads)
    if norm_sum.device.type == "cpu" and dense_fp32:
        # On the CPU torch._foreach_norm reduces each tensor on one thread,
        # while a BLAS dot product reads it with every thread. For the MLP on
        # 2 cores this cuts tracking from about 12% of a step to under 5% (BENCHMARKS.md).
        flat = [_flat_view(grad) for grad in grads]
        norms = torch.stack([torch.dot(values, values) for values in flat]).sqrt()
    else:
        # One multi-tensor kernel for all parameters. It also takes the
        # gradients where a squared norm could leave the range of its dtype
        # (float16, or float64 cast to float32) or a dot product does not apply
        # (complex, sparse).
        norms = torch.stack(torch._foreach_norm(grads)).float()
    norm_sum += norms
    torch.maximum(norm_max, norms, out=norm_max)


def _flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return the elements of ``tensor`` as one dimension, without a copy where its memory is dense."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        # A channels_last gradient is dense in (N, H, W, C) order.
        return tensor.permute(0, 2, 3, 1).view(-1)
    return tensor.reshape(-1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    precision: str,
    channels_last: bool = False,
) -> EpochStats:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on the images."""
    device = images.device
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)

    start = _synchronized_time(device)
    for first in range(0, len(labels), batch_size):
        inputs = prepare_batch(images[first : first + batch_size], False, None, channels_last)
        targets = labels[first : first + batch_size]
        with autocast_context(device, precision):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        correct += (logits.argmax(dim=1) == targets).sum()
    seconds = _synchronized_time(device) - start

    num_images = max(len(labels), 1)
    return EpochStats(loss=loss_sum.item() / num_images, acc=correct.item() / num_images, seconds=seconds)


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
