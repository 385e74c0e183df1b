"""Expansion of the study configuration into experiments and runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cifar_study.config import ConfigError, build_study, canonical_value, format_value

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_study_has_six_experiments(config):
    study = build_study(config)
    assert list(study.experiments) == [
        "mlp_activation", "resnet18_lr", "mlpmixer_patch",
        "resnet18_weight_decay", "mlpmixer_blocks", "mlpmixer_width",
    ]


def test_run_counts_per_experiment(config):
    study = build_study(config)
    counts = {e.experiment_id: len(e.run_ids) for e in study.experiments.values()}
    assert counts == {
        "mlp_activation": 3, "resnet18_lr": 5, "mlpmixer_patch": 4,
        "resnet18_weight_decay": 5, "mlpmixer_blocks": 4, "mlpmixer_width": 4,
    }


def test_identical_settings_share_one_run(config):
    study = build_study(config)
    patch_runs = set(study.experiments["mlpmixer_patch"].run_ids)
    width_runs = set(study.experiments["mlpmixer_width"].run_ids)
    assert patch_runs & width_runs == {"mlpmixer"}
    assert len(study.runs) == 24


def test_defaults_reach_every_run(config):
    study = build_study(config)
    run = study.runs["mlp"]
    assert run.settings["batch_size"] == 128
    assert run.settings["optimizer"] == "adamw"
    assert run.settings["lr"] == 1e-3
    assert run.settings["weight_decay"] == 5e-4
    assert run.settings["epochs"] == 15
    assert run.settings["seed"] == 42
    assert run.settings["hidden_sizes"] == [1024, 512, 64, 64]


def test_experiment_overrides_apply(config):
    study = build_study(config)
    for run in study.runs_of("resnet18_weight_decay"):
        assert run.settings["lr"] == 1e-4
        assert run.settings["epochs"] == 100
        assert run.settings["early_stopping_patience"] == 10
    for run in study.runs_of("resnet18_lr"):
        assert run.settings["optimizer"] == "adam"
        assert run.settings["weight_decay"] == 0


def test_run_id_canonical_numbers(config):
    a = copy.deepcopy(config)
    b = copy.deepcopy(config)
    a["experiments"]["resnet18_lr"]["sweep"]["lr"] = [1e-5]
    b["experiments"]["resnet18_lr"]["sweep"]["lr"] = ["0.00001"]
    assert build_study(a).experiments["resnet18_lr"].run_ids == build_study(b).experiments["resnet18_lr"].run_ids


def test_run_id_ignores_key_order(config):
    reordered = copy.deepcopy(config)
    reordered["defaults"] = dict(reversed(list(config["defaults"].items())))
    settings = config["experiments"]["resnet18_lr"]["settings"]
    reordered["experiments"]["resnet18_lr"]["settings"] = dict(reversed(list(settings.items())))
    assert list(build_study(config).runs) == list(build_study(reordered).runs)


def test_run_id_is_readable(config):
    study = build_study(config)
    assert "mlp__activation=tanh" in study.runs
    assert "mlpmixer__patch_size=8" in study.runs
    assert "resnet18__lr=1e-05__optimizer=adam__weight_decay=0" in study.runs


def test_yaml_exponent_strings_become_numbers():
    assert canonical_value("1e-3") == 0.001
    assert canonical_value(1.0) == 1
    assert canonical_value([0.5, "4.0"]) == [0.5, 4]
    assert format_value(0.00001) == "1e-05"


def test_sweep_of_two_keys_is_cartesian(config):
    config["experiments"] = {
        "grid": {"model": "mlp", "sweep": {"activation": ["relu", "tanh"], "lr": [1e-3, 1e-2, 0.1]}},
    }
    study = build_study(config)
    settings = [(r.settings["activation"], r.settings["lr"]) for r in study.runs_of("grid")]
    assert len(settings) == 6
    assert set(settings) == {(a, lr) for a in ("relu", "tanh") for lr in (1e-3, 1e-2, 0.1)}


def test_seeds_repeat_every_run(config):
    config["experiments"] = {"seeded": {"model": "mlp", "seeds": [1, 2, 3], "sweep": {"activation": ["relu", "tanh"]}}}
    study = build_study(config)
    runs = study.runs_of("seeded")
    assert len(runs) == 6
    assert sorted({r.settings["seed"] for r in runs}) == [1, 2, 3]
    assert study.experiments["seeded"].seeds == (1, 2, 3)


def test_new_experiment_needs_no_code(config):
    config["experiments"]["mixer_dropout"] = {
        "model": "mlpmixer",
        "settings": {"optimizer": "sgd", "momentum": 0.0},
        "sweep": {"dropout": [0.0, 0.1], "num_blocks": [2]},
    }
    study = build_study(config)
    assert study.experiments["mixer_dropout"].run_ids == (
        "mlpmixer__momentum=0__num_blocks=2__optimizer=sgd",
        "mlpmixer__dropout=0.1__momentum=0__num_blocks=2__optimizer=sgd",
    )


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("experiments", "mlpmixer_patch", "sweep", "patch_size"), [5], "patch_size: invalid value 5"),
        (("experiments", "mlp_activation", "sweep", "activation"), ["swish"], "one of relu, tanh, sigmoid, gelu"),
        (("experiments", "resnet18_lr", "sweep", "lr"), [-1], "positive number"),
        (("experiments", "resnet18_lr", "sweep", "lr"), [], "non-empty list"),
        (("experiments", "resnet18_lr", "model"), "vgg", "unknown model 'vgg'"),
        (("experiments", "resnet18_lr", "settings", "optimiser"), "adam", "unknown setting 'optimiser'"),
        (("defaults", "batch_size"), 0, "defaults.batch_size: invalid value 0"),
        (("defaults", "precision"), "fp16", "one of auto, bf16, fp32"),
        (("models", "mlp", "hidden_sizes"), [], "non-empty list of positive integers"),
        (("models", "mlpmixer", "mlp_ratios"), [0.5], "two positive numbers"),
    ],
)
def test_invalid_config_names_key(config, path, value, message):
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError) as error:
        build_study(config)
    assert message in str(error.value)


def test_missing_default_is_named(config):
    del config["defaults"]["seed"]
    with pytest.raises(ConfigError, match="missing settings seed"):
        build_study(config)


def test_repeated_seed_is_rejected(config):
    config["experiments"]["mlp_activation"]["seeds"] = [1, 1]
    with pytest.raises(ConfigError, match="repeated seed"):
        build_study(config)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"val_size": 5005}, "data.val_size: invalid value 5005"),
        ({"val_size": 5000, "subset": {"val_per_class": 900}}, "data.subset.val_per_class: invalid value 900"),
        ({"val_size": 5000, "subset": {"train_per_class": 4600}}, "use at most 4500"),
        ({"val_size": 5000, "subset": {"test_per_class": 1001}}, "use at most 1000"),
    ],
)
def test_invalid_data_sizes_are_named(config, data, message):
    config["data"].update(data)
    with pytest.raises(ConfigError, match=message):
        build_study(config)


def test_overlong_run_id_is_rejected(config):
    config["experiments"]["mlp_activation"]["settings"] = {"hidden_sizes": list(range(1000, 1060))}
    with pytest.raises(ConfigError, match="characters long"):
        build_study(config)
