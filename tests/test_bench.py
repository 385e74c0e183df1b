"""The benchmark script in a tiny mode, on real CIFAR-10 images; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SPEED_KEYS = {
    "model", "device", "precision", "pipeline_img_per_s", "reference_img_per_s", "speedup", "matmul_share",
}


def run_bench(*args: str, timeout: float = 300) -> list[dict]:
    command = [sys.executable, "-m", "cifar_study.bench", *args, "--config", str(REPO / "config.yaml"),
               "--threads", "1", "--json"]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-4000:]
    return [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def speed_rows(prepared_small):
    return run_bench(
        "speed", "--data", str(prepared_small), "--device", "cpu", "--images", "64", "--batch-size", "16",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--matmul-sizes", "256",
    )


def test_speed_one_row_per_model(speed_rows):
    assert [row["model"] for row in speed_rows] == ["mlp", "resnet18", "mlpmixer"]


@pytest.mark.parametrize("index", range(3))
def test_speed_row_keys_and_values(speed_rows, index):
    row = speed_rows[index]
    assert SPEED_KEYS <= set(row)
    assert row["device"] == "cpu"
    assert row["precision"] in ("bf16", "fp32")
    for key in ("pipeline_img_per_s", "reference_img_per_s", "speedup", "matmul_share"):
        assert isinstance(row[key], float), key
        assert math.isfinite(row[key]), (key, row[key])
        assert row[key] > 0, (key, row[key])
    assert row["speedup"] == pytest.approx(row["pipeline_img_per_s"] / row["reference_img_per_s"])
    assert row["batch_size"] == 16
    assert row["flops_per_step"] > 0
    assert row["matmul_share_paired"] > 0
    assert row["other_load"] >= 0
    assert math.isfinite(row["grad_norm_cost"])


def test_speed_flops_follow_model_size(speed_rows):
    flops = {row["model"]: row["flops_per_step"] for row in speed_rows}
    assert flops["mlp"] < flops["mlpmixer"] < flops["resnet18"]


def test_speed_rejects_too_few_images(prepared_small):
    command = [sys.executable, "-m", "cifar_study.bench", "--data", str(prepared_small), "--models", "mlp",
               "--images", "16", "--batch-size", "16", "--steps", "2", "--config", str(REPO / "config.yaml")]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert "raise --images" in process.stderr


def test_speed_blocks_repeat_passes(prepared_small):
    # 64 images give 4 steps of 16, so 7 steps take a pass of 4 and one of 3.
    rows = run_bench("speed", "--data", str(prepared_small), "--device", "cpu", "--models", "mlp", "--images", "64",
                     "--batch-size", "16", "--steps", "7", "--warmup", "1", "--repeats", "1", "--matmul-sizes", "256")
    assert rows[0]["pipeline_steps"] == 7


def test_pipeline_block_runs_requested_steps(prepared_small):
    from cifar_study import bench

    args = bench.parse_args(["speed", "--config", str(REPO / "config.yaml"), "--batch-size", "16"])
    setup = bench.speed_setup(args, "mlp", torch.device("cpu"))
    data = bench.load_images(str(prepared_small), None, 64)
    model = bench.build_model("mlp", **bench.model_args("mlp", setup.settings))
    optimizer = bench.make_optimizer(model, setup.settings)
    steps = []
    model.register_forward_hook(lambda module, inputs, output: steps.append(len(output)))

    for requested in (1, 4, 10):
        steps.clear()
        bench._pipeline_block(setup, model, optimizer, data["train_images"], data["train_labels"],
                              torch.Generator().manual_seed(0), True, requested)
        assert len(steps) == requested
        assert set(steps) == {16}


def test_accuracy_tiny_preset(prepared_small):
    rows = run_bench("accuracy", "--preset", "tiny", "--data", str(prepared_small), "--device", "cpu",
                     "--models", "mlp")
    assert len(rows) == 1
    for key in ("fast_val_acc", "pipeline_fp32_val_acc", "reference_val_acc"):
        assert 0.0 <= rows[0][key] <= 1.0, key


def test_profile_splits_the_step(prepared_small):
    rows = run_bench("profile", "--data", str(prepared_small), "--device", "cpu", "--models", "mlp", "resnet18",
                     "--batch-size", "16", "--steps", "2", "--warmup", "1", "--matmul-sizes", "256")
    assert [row["model"] for row in rows] == ["mlp", "resnet18"]
    for row in rows:
        shares = row["group_shares"]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert shares["matmul and convolution"] > 0.05, shares
        assert shares["optimizer"] > 0, shares
        assert shares["gradient norms"] > 0, shares
        # The kernels alone are faster than the whole step they are part of.
        assert row["kernel_matmul_share"] > row["step_matmul_share"] > 0
    assert rows[1]["group_shares"]["normalisation"] > 0


@pytest.mark.parametrize("name, group", [
    ("aten::mkldnn_convolution", "matmul and convolution"),
    ("aten::convolution_backward", "matmul and convolution"),
    ("aten::addmm", "matmul and convolution"),
    ("aten::native_batch_norm_backward", "normalisation"),
    ("aten::gelu_backward", "activations"),
    ("aten::_foreach_norm", "gradient norms"),
    ("aten::dot", "gradient norms"),
    ("aten::_fused_adamw_", "optimizer"),
    ("aten::_to_copy", "copies and casts"),
    ("aten::grid_sampler_2d", "augmentation"),
    ("aten::add_", "other"),
])
def test_operator_groups(name, group):
    from cifar_study.bench import operator_group

    assert operator_group(name) == group


def test_compare_runs_pairs_by_run_id(tmp_path):
    from synthetic_runs import write_run

    settings = {"hidden_sizes": [64, 32]}
    for folder, accuracies in (("first", (0.40, 0.30, 0.50)), ("second", (0.38, 0.31, None))):
        for run_id, accuracy in zip(("mlp", "mlp__lr=0.1", "mlp__lr=0.01"), accuracies):
            if accuracy is not None:
                write_run(tmp_path / folder / run_id, run_id, "mlp", settings, best_val_acc=accuracy)

    rows = run_bench("compare-runs", "--runs", str(tmp_path / "first"), str(tmp_path / "second"))
    runs = {row["run_id"]: row for row in rows if "run_id" in row}
    assert sorted(runs) == ["mlp", "mlp__lr=0.1"]
    assert runs["mlp"]["val_diff_points"] == pytest.approx(2.0)
    assert runs["mlp__lr=0.1"]["val_diff_points"] == pytest.approx(-1.0)
    summary = next(row for row in rows if "runs" in row)
    assert summary["model"] == "mlp"
    assert summary["runs"] == 2
    assert summary["val_diff_points"]["mean"] == pytest.approx(0.5)
    assert summary["val_diff_points"]["standard_error"] == pytest.approx(1.5)


def _compare_error(first, second) -> str:
    command = [sys.executable, "-m", "cifar_study.bench", "compare-runs", "--runs", str(first), str(second)]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1, process.stdout
    assert "Traceback" not in process.stderr
    return process.stderr


@pytest.mark.parametrize("damage, expected", [
    ('{"run_id": "mlp", ', "mlp/run.json is not a valid run.json (Expecting"),
    ("5", "mlp/run.json is not a valid run.json (not a JSON object)"),
    ('{"run_id": "mlp", "model": "mlp", "precision": "fp32", "best_val_acc": "0.4", "test_acc": 0.4}',
     "best_val_acc is '0.4', expected a fraction from 0 to 1 or null"),
    ('{"run_id": "mlp", "model": "mlp", "precision": "fp32", "best_val_acc": 38.6, "test_acc": 0.4}',
     "best_val_acc is 38.6, expected a fraction"),
    ('{"run_id": "mlp", "model": "mlp", "precision": "fp32", "best_val_acc": NaN, "test_acc": 0.4}',
     "best_val_acc is nan, expected a fraction"),
    ('{"run_id": ["mlp"], "model": "mlp", "precision": "fp32", "best_val_acc": 0.4, "test_acc": 0.4}',
     "run_id is ['mlp'], expected a string"),
    ('{"run_id": "mlp", "model": "mlp", "precision": "fp32", "best_val_acc": 0.4}', "missing test_acc"),
])
def test_compare_runs_names_damaged_run_json(tmp_path, damage, expected):
    from synthetic_runs import write_run

    for folder in ("first", "second"):
        write_run(tmp_path / folder / "mlp", "mlp", "mlp", {"hidden_sizes": [64, 32]}, best_val_acc=0.4)
    (tmp_path / "second" / "mlp" / "run.json").write_text(damage)
    message = _compare_error(tmp_path / "first", tmp_path / "second")
    assert expected in message
    assert "rerun that run or remove its folder" in message


def test_compare_runs_rejects_bad_folders(tmp_path):
    from synthetic_runs import write_run

    settings = {"hidden_sizes": [64, 32]}
    write_run(tmp_path / "first" / "mlp", "mlp", "mlp", settings, best_val_acc=0.4)
    write_run(tmp_path / "other" / "mlp__lr=0.1", "mlp__lr=0.1", "mlp", settings, best_val_acc=0.4)
    write_run(tmp_path / "twice" / "a", "mlp", "mlp", settings, best_val_acc=0.4)
    write_run(tmp_path / "twice" / "b", "mlp", "mlp", settings, best_val_acc=0.3)
    (tmp_path / "empty").mkdir()

    assert "no run id is in both" in _compare_error(tmp_path / "first", tmp_path / "other")
    assert "contains no <run-id>/run.json" in _compare_error(tmp_path / "first", tmp_path / "empty")
    assert "is not a folder" in _compare_error(tmp_path / "first", tmp_path / "first" / "mlp" / "run.json")
    assert "not found" in _compare_error(tmp_path / "first", tmp_path / "missing")
    assert "run id 'mlp' is in both" in _compare_error(tmp_path / "first", tmp_path / "twice")


def test_compare_runs_skips_runs_without_best_epoch(tmp_path):
    from synthetic_runs import write_run

    settings = {"hidden_sizes": [64, 32]}
    for folder in ("first", "second"):
        write_run(tmp_path / folder / "mlp", "mlp", "mlp", settings, best_val_acc=0.4)
        write_run(tmp_path / folder / "mlp__lr=0.1", "mlp__lr=0.1", "mlp", settings, best_val_acc=0.3)
    # A run that diverged in its first epoch writes null accuracies.
    path = tmp_path / "second" / "mlp__lr=0.1" / "run.json"
    summary = json.loads(path.read_text())
    summary.update(best_val_acc=None, test_acc=None)
    path.write_text(json.dumps(summary))

    rows = run_bench("compare-runs", "--runs", str(tmp_path / "first"), str(tmp_path / "second"))
    runs = {row["run_id"]: row for row in rows if "run_id" in row}
    assert runs["mlp__lr=0.1"]["val_diff_points"] is None
    summary = next(row for row in rows if "runs" in row)
    assert summary["runs"] == 2
    assert summary["val_diff_points"]["mean"] == pytest.approx(0.0)
    # One difference has no standard error, written as null rather than NaN.
    assert summary["val_diff_points"]["standard_error"] is None


def test_gpu_estimate_covers_every_run():
    from cifar_study.config import build_study
    import yaml

    rows = run_bench("gpu-estimate")
    assert len(rows) == 1
    study = build_study(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert {run["run_id"] for run in rows[0]["runs"]} == set(study.runs)
    assert rows[0]["total_hours"] > 0


def test_gpu_estimate_shared_jobs_bound():
    one_job = run_bench("gpu-estimate")[0]
    four_jobs = run_bench("gpu-estimate", "--jobs", "4")[0]
    assert one_job["shared_wall_hours"] == pytest.approx(one_job["total_hours"])
    assert four_jobs["total_hours"] == pytest.approx(one_job["total_hours"])
    assert four_jobs["shared_wall_hours"] < four_jobs["total_hours"]
    assert four_jobs["shared_wall_hours"] >= four_jobs["gpu_compute_hours"]


@pytest.mark.parametrize("option, value, expected", [
    ("--jobs", "0", "expected a positive integer, got '0'"),
    ("--repeats", "0", "expected a positive integer, got '0'"),
    ("--steps", "-3", "expected a positive integer, got '-3'"),
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--warmup", "0", "expected a positive integer, got '0'"),
    ("--block-seconds", "0", "expected a positive number, got '0'"),
    ("--gpu-share", "1.5", "expected a share in (0, 1], got '1.5'"),
    ("--threads", "two", "expected a positive integer, got 'two'"),
    ("--op-overhead-us", "nan", "expected a number of 0 or more, got 'nan'"),
])
def test_bench_rejects_invalid_option(option, value, expected):
    command = [sys.executable, "-m", "cifar_study.bench", "gpu-estimate", option, value,
               "--config", str(REPO / "config.yaml")]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert f"argument {option}: {expected}" in process.stderr


@pytest.mark.parametrize("device, expected", [
    ("foo", "invalid --device 'foo'; use cpu, cuda or cuda:N"),
    ("meta", "invalid --device 'meta'; use cpu, cuda or cuda:N"),
    pytest.param("cuda", "--device cuda requested but CUDA is not available; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")),
])
def test_bench_rejects_unusable_device(prepared_small, device, expected):
    command = [sys.executable, "-m", "cifar_study.bench", "profile", "--data", str(prepared_small),
               "--device", device, "--config", str(REPO / "config.yaml")]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert expected in process.stderr
    assert "Traceback" not in process.stderr
