"""Device, precision and GPU claims."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from cifar_study.devices import GpuSlot, cpu_supports_bf16, resolve_precision, select_device


def test_fp32_when_requested():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_auto_follows_hardware():
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_cpu_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.fail("this test expects a machine without CUDA")
    device, slot = select_device(None, tmp_path)
    assert device.type == "cpu"
    assert slot is None


def test_cuda_request_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.fail("this test expects a machine without CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda", tmp_path)


HOLD_SLOT = textwrap.dedent("""
    import sys, time
    from cifar_study.devices import GpuSlot
    slot = GpuSlot(sys.argv[1], num_gpus=2, timeout=1)
    print(slot.acquire(), flush=True)
    time.sleep(30)
""")


def test_concurrent_jobs_claim_distinct_gpus(tmp_path):
    holders = [
        subprocess.Popen([sys.executable, "-c", HOLD_SLOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        claimed = sorted(int(p.stdout.readline()) for p in holders)
        assert claimed == [0, 1]

        # Both GPUs are held, so a third job waits and then gives up with a clear error.
        with pytest.raises(TimeoutError, match="all 2 GPUs"):
            GpuSlot(tmp_path, num_gpus=2, timeout=1).acquire()
    finally:
        for p in holders:
            p.kill()
            p.wait()


def test_killed_job_frees_its_gpu(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "0"
    holder.kill()
    holder.wait()
    slot = GpuSlot(tmp_path, num_gpus=1, timeout=1)
    assert slot.acquire() == 0
    slot.release()
