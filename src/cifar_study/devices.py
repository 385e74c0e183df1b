"""Choose the training device, its precision and, on multi-GPU machines, one free GPU."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("cifar_study.devices")


def cpu_supports_bf16() -> bool:
    """Return whether this CPU computes bf16 natively (AVX512-BF16 or AMX), through oneDNN."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(requested: str, device: torch.device) -> str:
    """Return "bf16" or "fp32" for the ``precision`` setting on ``device``.

    "auto" takes bf16 autocast where the hardware runs it natively and fp32
    elsewhere; "bf16" on hardware without it raises ValueError.
    """
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        supported = cpu_supports_bf16()
    if requested == "bf16" and not supported:
        raise ValueError(f"precision='bf16' is not supported natively on {device}; use precision: auto or fp32")
    if requested not in ("auto", "bf16"):
        raise ValueError(f"precision={requested!r} is unknown; use auto, bf16 or fp32")
    return "bf16" if supported else "fp32"


# Models that train in channels_last (NHWC) memory format. cuDNN's tensor-core
# convolutions work in NHWC. On 2 cores of an AVX512-BF16 CPU (torch 2.14)
# ResNet18 trained 7-16% and MLP-Mixer 3-23% faster in bf16 with it
# (BENCHMARKS.md). For MLP-Mixer it makes the patch embedding's flatten and
# transpose a view instead of a copy.
CHANNELS_LAST_MODELS = frozenset({"resnet18", "mlpmixer"})


@dataclass(frozen=True)
class FastPath:
    """The speed choices of a run on its device: autocast precision, memory format and compilation."""

    precision: str
    channels_last: bool
    compile: bool


def choose_fast_path(
    model_name: str, device: torch.device, precision: str = "auto", compile_model: bool = False
) -> FastPath:
    """Return the fast-path choices for ``model_name`` on ``device``.

    ``precision`` is the run's setting (auto, bf16 or fp32), resolved by
    ``resolve_precision``. ``compile_model`` is the run's opt-in to ``torch.compile``.
    """
    return FastPath(
        precision=resolve_precision(precision, device),
        channels_last=model_name in CHANNELS_LAST_MODELS,
        compile=compile_model,
    )


def place_model(model: torch.nn.Module, device: torch.device, fast_path: FastPath) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move ``model`` to ``device`` in the fast path's memory format and set the backend flags.

    Returns the model itself, whose state dict and parameters the caller keeps,
    and the module to call in training steps: the model, or its compiled
    wrapper when ``fast_path.compile`` is set.
    """
    model = model.to(device)
    if fast_path.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Input shapes are fixed, so autotuning the convolution algorithms pays off after one step.
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if fast_path.compile else model
    return model, step_model


class GpuSlot:
    """An exclusive claim on one GPU among those visible, held through an flock'ed file.

    Snakemake's ``--resources gpu=N`` bounds how many training jobs run at once
    but does not say which GPU each should use. Each job claims the lowest
    free index; the kernel drops the lock when the process ends, killed or not.
    """

    def __init__(self, lock_dir: str | Path, num_gpus: int, timeout: float = 600.0):
        self.lock_dir = Path(lock_dir)
        self.num_gpus = num_gpus
        self.timeout = timeout
        self.index: int | None = None
        self._file = None

    def acquire(self) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            for index in range(self.num_gpus):
                handle = open(self.lock_dir / f"gpu{index}.lock", "a+")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                self._file, self.index = handle, index
                return index
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"all {self.num_gpus} GPUs stayed claimed for {self.timeout:.0f} s (locks in {self.lock_dir}); "
                    f"run with --resources gpu=N where N is at most the number of GPUs"
                )
            time.sleep(1.0)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file, self.index = None, None


def select_device(requested: str | None, lock_dir: str | Path) -> tuple[torch.device, GpuSlot | None]:
    """Return the device to train on and the GPU claim that must live as long as the run.

    ``requested`` is "cpu", "cuda", "cuda:N" or None (CUDA when present, else
    the CPU). Where a scheduler has set CUDA_VISIBLE_DEVICES (SLURM does for
    ``--gpus``), the job takes the first GPU it was given; otherwise it claims
    a free one.
    """
    if requested is not None and requested != "cuda":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={requested!r} requested but CUDA is not available; use --device cpu")
        return device, None
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ValueError("device='cuda' requested but CUDA is not available; use --device cpu")
        return torch.device("cpu"), None
    if os.environ.get("CUDA_VISIBLE_DEVICES") or torch.cuda.device_count() == 1:
        return torch.device("cuda:0"), None
    slot = GpuSlot(lock_dir, torch.cuda.device_count())
    index = slot.acquire()
    log.info("claimed GPU %d of %d", index, torch.cuda.device_count())
    return torch.device(f"cuda:{index}"), slot
