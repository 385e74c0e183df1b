"""Batched data augmentation and normalisation on the training device.

Images stay uint8 on the device; each batch is flipped, cropped, resized and
normalised with tensor operations, so no per-image Python code runs during
training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cifar_study.data import MEAN, STD

# Random resized crop: the crop covers this fraction of the image area and has
# this width/height ratio, both drawn uniformly (the ratio on a log scale).
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (0.9, 1.1)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn uint8 images (N, 3, H, W) into floats normalised with the CIFAR-10 mean and std."""
    mean = torch.tensor(MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255 - mean) / std


def random_flip_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 and take a random resized crop.

    ``images`` are floats (N, C, H, W). The crop box is continuous and resampled
    bilinearly back to H x W with one ``grid_sample`` call.
    NOTE: torchvision's RandomResizedCrop rounds the box to whole pixels and
    resizes with antialiasing; at scales 0.8-1.0 the two differ by under a pixel.
    """
    n, _, height, width = images.shape
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    area = uniform(*CROP_SCALE)
    log_ratio = uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    ratio = torch.exp(log_ratio)

    # Crop width and height as fractions of the image, capped at the full image.
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)

    # Crop centres in normalised coordinates [-1, 1], uniform over valid positions.
    centre_x = (uniform(0.0, 1.0) * 2 - 1) * (1 - crop_w)
    centre_y = (uniform(0.0, 1.0) * 2 - 1) * (1 - crop_h)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    sign_x = torch.where(flip, -1.0, 1.0).to(crop_w.dtype)

    # The grid of F.affine_grid for a scale-and-shift theta, built by broadcasting
    # because affine_grid's batched matmul costs about 5x more on the CPU.
    # Pixel centres in normalised coordinates (align_corners=False).
    base_x = (torch.arange(width, device=device, dtype=images.dtype) * 2 + 1) / width - 1
    base_y = (torch.arange(height, device=device, dtype=images.dtype) * 2 + 1) / height - 1
    grid_x = (crop_w * sign_x).unsqueeze(1) * base_x + centre_x.unsqueeze(1)
    grid_y = crop_h.unsqueeze(1) * base_y + centre_y.unsqueeze(1)
    grid = torch.stack(
        (grid_x.unsqueeze(1).expand(n, height, width), grid_y.unsqueeze(2).expand(n, height, width)), dim=-1
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
