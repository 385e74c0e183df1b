"""Expand the study configuration into experiments and runs.

A run is one training job, fully described by its resolved settings: the
training defaults, the model's defaults, the experiment's overrides and one
point of its sweep, in that order of precedence. Its id lists the settings that
differ from the defaults, with values written canonically, so the same settings
give the same id whatever the order of keys or the spelling of a number
(``1e-05`` and ``0.00001``), and two experiments that ask for the same settings
share one run.

This module imports no torch, so that the Snakefile, which calls it at every
``snakemake`` invocation, stays fast.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SIZE = 32
NUM_CLASSES = 10
# CIFAR-10 has 5,000 training and 1,000 test images of each class.
TRAIN_PER_CLASS = 5000
TEST_PER_CLASS = 1000
# Run ids name folders; most file systems allow 255 bytes per name.
MAX_RUN_ID_LENGTH = 200
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")

# Training settings and the kind of value each accepts. Model arguments are
# listed per model in MODEL_ARGS.
TRAIN_SETTINGS = {
    "batch_size": "positive_int",
    "eval_batch_size": "positive_int",
    "optimizer": OPTIMIZERS,
    "lr": "positive_number",
    "lr_schedule": LR_SCHEDULES,
    "weight_decay": "non_negative_number",
    "momentum": "unit_interval",
    "epochs": "positive_int",
    "early_stopping_patience": "optional_positive_int",
    "seed": "non_negative_int",
    "augment": "bool",
    "precision": PRECISIONS,
    "compile": "bool",
}

MODEL_ARGS = {
    "mlp": {
        "hidden_sizes": "positive_int_list",
        "activation": ACTIVATIONS,
        "dropout": "dropout",
    },
    "resnet18": {
        "widths": "positive_int_list",
        "blocks": "positive_int_list",
    },
    "mlpmixer": {
        "patch_size": "patch_size",
        "embed_dim": "positive_int",
        "num_blocks": "positive_int",
        "mlp_ratios": "ratio_pair",
        "dropout": "dropout",
        "activation": ACTIVATIONS,
    },
}

# Settings that change how fast a run trains but not what it computes are
# left out of the run id, so that turning them on reuses finished runs.
# NOTE: bf16 and fp32 runs differ slightly in their numbers; precision stays
# out of the id on purpose, because "auto" resolves per machine.
ID_EXCLUDED = frozenset({"eval_batch_size", "compile", "precision"})

RUN_ID_PATTERN = r"[A-Za-z0-9_.=+-]+"
_STRING_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ConfigError(ValueError):
    """An invalid study configuration; the message names the key and the fix."""


@dataclass(frozen=True)
class Run:
    """One training job: its id, model and every resolved setting."""

    run_id: str
    model: str
    settings: dict[str, Any]

    @property
    def model_args(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings.items() if k in MODEL_ARGS[self.model]}

    @property
    def train_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings.items() if k in TRAIN_SETTINGS}


@dataclass(frozen=True)
class Experiment:
    """A question of the study: a model, fixed overrides and a sweep."""

    experiment_id: str
    model: str
    title: str
    sweep_keys: tuple[str, ...]
    run_ids: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Study:
    """All experiments of a configuration and the distinct runs they need."""

    experiments: dict[str, Experiment]
    runs: dict[str, Run]

    def runs_of(self, experiment_id: str) -> list[Run]:
        return [self.runs[run_id] for run_id in self.experiments[experiment_id].run_ids]

    def experiments_of_model(self, model: str) -> list[Experiment]:
        return [e for e in self.experiments.values() if e.model == model]


def canonical_value(value: Any) -> Any:
    """Return ``value`` in one canonical form: integral numbers as int, others as float.

    Strings that read as numbers (YAML 1.1 reads ``1e-3`` as a string) become
    numbers, lists are canonicalised item by item and tuples become lists.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [canonical_value(item) for item in value]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return float(value)
        if float(value).is_integer() and abs(value) < 1e15:
            return int(value)
        return float(value)
    return value


def format_value(value: Any) -> str:
    """Write a canonical value as it appears in a run id (``1e-05``, ``0.5-4``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return "-".join(format_value(item) for item in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def make_run_id(model: str, settings: dict[str, Any], base: dict[str, Any]) -> str:
    """Build the readable id of a run from the settings that differ from ``base``."""
    parts = [model]
    for key in sorted(settings):
        if key in ID_EXCLUDED or settings[key] == base.get(key):
            continue
        parts.append(f"{key}={format_value(settings[key])}")
    return "__".join(parts)


def _check_value(where: str, kind: Any, value: Any) -> None:
    """Raise ConfigError unless ``value`` is of ``kind`` (a name or a tuple of choices)."""

    def fail(expected: str) -> None:
        raise ConfigError(f"{where}: invalid value {value!r}; expected {expected}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        if value not in kind:
            fail("one of " + ", ".join(kind))
    elif kind == "positive_int":
        if not is_int or value <= 0:
            fail("a positive integer")
    elif kind == "non_negative_int":
        if not is_int or value < 0:
            fail("a non-negative integer")
    elif kind == "optional_positive_int":
        if value is not None and (not is_int or value <= 0):
            fail("a positive integer, or null to turn it off")
    elif kind == "positive_number":
        if not is_number or not math.isfinite(value) or value <= 0:
            fail("a positive number such as 1e-3")
    elif kind == "non_negative_number":
        if not is_number or not math.isfinite(value) or value < 0:
            fail("a number >= 0 such as 5e-4")
    elif kind == "unit_interval":
        if not is_number or not 0 <= value < 1:
            fail("a number in [0, 1)")
    elif kind == "dropout":
        if not is_number or not 0 <= value < 1:
            fail("a dropout probability in [0, 1)")
    elif kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
    elif kind == "positive_int_list":
        if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            fail("a non-empty list of positive integers")
    elif kind == "ratio_pair":
        if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
        ):
            fail("two positive numbers [token_mixing, channel_mixing], such as [0.5, 4.0]")
    elif kind == "patch_size":
        if not is_int or value <= 0 or IMAGE_SIZE % value != 0:
            divisors = [d for d in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % d == 0]
            fail(f"a divisor of the image size {IMAGE_SIZE}: one of {divisors}")
    else:
        raise AssertionError(f"unknown value kind {kind!r}")


def _check_settings(where: str, model: str, settings: dict[str, Any]) -> None:
    allowed = {**TRAIN_SETTINGS, **MODEL_ARGS[model]}
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown setting {key!r} for model {model!r}; "
                f"valid settings are {', '.join(sorted(allowed))}"
            )
        _check_value(f"{where}.{key}", allowed[key], value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
    return {str(k): canonical_value(v) for k, v in value.items()}


def _expand_sweep(where: str, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the Cartesian product of the sweep's values, in the order written."""
    keys = list(sweep)
    value_lists = []
    for key in keys:
        values = sweep[key]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.sweep.{key}: expected a non-empty list of values, got {values!r}")
        value_lists.append(values)
    return [dict(zip(keys, point)) for point in itertools.product(*value_lists)]


def merge_config(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into ``base`` key by key, as Snakemake merges config files."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_config(base[key], value)
        else:
            merged[key] = value
    return merged


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Read YAML config files, each later one overlaid on the ones before."""
    import yaml

    config: dict[str, Any] = {}
    for path in paths:
        config = merge_config(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def check_data_config(data: dict[str, Any]) -> None:
    """Check split and subset sizes against CIFAR-10's class sizes, before any decoding."""
    val_size = data.get("val_size", 5000)
    if val_size % NUM_CLASSES or not 0 < val_size < TRAIN_PER_CLASS * NUM_CLASSES:
        raise ConfigError(
            f"data.val_size: invalid value {val_size}; expected a multiple of {NUM_CLASSES} below "
            f"{TRAIN_PER_CLASS * NUM_CLASSES}, because the split takes the same number of images from each class"
        )
    limits = {
        "train_per_class": TRAIN_PER_CLASS - val_size // NUM_CLASSES,
        "val_per_class": val_size // NUM_CLASSES,
        "test_per_class": TEST_PER_CLASS,
    }
    for name, value in (data.get("subset") or {}).items():
        if value is not None and name in limits and value > limits[name]:
            raise ConfigError(
                f"data.subset.{name}: invalid value {value}; the split has {limits[name]} images per class, "
                f"so use at most {limits[name]}, or null for all"
            )


def build_study(config: dict[str, Any]) -> Study:
    """Validate the experiments of ``config`` and expand them into distinct runs.

    Raises ConfigError, naming the key and the valid choices, on an unknown
    model, an unknown setting, an invalid value or an empty sweep.
    """
    if config.get("data"):
        check_data_config(config["data"])
    defaults = _mapping("defaults", config.get("defaults"))
    missing = sorted(set(TRAIN_SETTINGS) - set(defaults))
    if missing:
        raise ConfigError(f"defaults: missing settings {', '.join(missing)}; every training setting needs a default")
    for key, value in defaults.items():
        if key not in TRAIN_SETTINGS:
            raise ConfigError(
                f"defaults: unknown setting {key!r}; valid settings are {', '.join(sorted(TRAIN_SETTINGS))}"
            )
        _check_value(f"defaults.{key}", TRAIN_SETTINGS[key], value)

    model_defaults = {}
    for model, args in (config.get("models") or {}).items():
        if model not in MODEL_ARGS:
            raise ConfigError(f"models: unknown model {model!r}; valid models are {', '.join(MODEL_ARGS)}")
        args = _mapping(f"models.{model}", args)
        unknown = sorted(set(args) - set(MODEL_ARGS[model]))
        if unknown:
            raise ConfigError(
                f"models.{model}: unknown argument {unknown[0]!r}; valid arguments are "
                f"{', '.join(sorted(MODEL_ARGS[model]))}"
            )
        _check_settings(f"models.{model}", model, args)
        model_defaults[model] = args

    experiments: dict[str, Experiment] = {}
    runs: dict[str, Run] = {}
    raw_experiments = config.get("experiments") or {}
    if not raw_experiments:
        raise ConfigError("experiments: no experiment declared; add at least one under 'experiments:'")

    for experiment_id, spec in raw_experiments.items():
        where = f"experiments.{experiment_id}"
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(experiment_id)):
            raise ConfigError(f"{where}: invalid experiment id; use letters, digits and underscores only")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with 'model' and 'sweep', got {spec!r}")
        model = spec.get("model")
        if model not in MODEL_ARGS:
            raise ConfigError(f"{where}.model: unknown model {model!r}; valid models are {', '.join(MODEL_ARGS)}")

        base = {**defaults, **model_defaults.get(model, {})}
        overrides = _mapping(f"{where}.settings", spec.get("settings"))
        _check_settings(f"{where}.settings", model, overrides)

        sweep = _mapping(f"{where}.sweep", spec.get("sweep"))
        points = _expand_sweep(where, sweep) if sweep else [{}]
        seeds = [canonical_value(s) for s in spec.get("seeds") or []]
        for seed in seeds:
            _check_value(f"{where}.seeds", "non_negative_int", seed)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}.seeds: repeated seed in {seeds}; list each seed once")

        run_ids: list[str] = []
        for point in points:
            _check_settings(f"{where}.sweep", model, point)
            for seed in seeds or [None]:
                settings = {**base, **overrides, **point}
                if seed is not None:
                    settings["seed"] = seed
                missing_args = sorted(set(MODEL_ARGS[model]) - set(settings))
                if missing_args:
                    raise ConfigError(
                        f"{where}: model {model!r} has no value for {', '.join(missing_args)}; "
                        f"set it under models.{model}"
                    )
                for key, value in settings.items():
                    if isinstance(value, str) and not _STRING_VALUE.match(value):
                        raise ConfigError(
                            f"{where}.{key}: invalid value {value!r}; use letters, digits, '.', '+', '-', '_'"
                        )
                run_id = make_run_id(model, settings, base)
                if len(run_id) > MAX_RUN_ID_LENGTH:
                    raise ConfigError(
                        f"{where}: the run id {run_id[:60]}... is {len(run_id)} characters long, over the "
                        f"{MAX_RUN_ID_LENGTH} that file names allow; override fewer settings or use shorter values"
                    )
                runs.setdefault(run_id, Run(run_id=run_id, model=model, settings=settings))
                if run_id not in run_ids:
                    run_ids.append(run_id)

        experiments[experiment_id] = Experiment(
            experiment_id=experiment_id,
            model=model,
            title=str(spec.get("title") or experiment_id.replace("_", " ")),
            sweep_keys=tuple(sweep),
            run_ids=tuple(run_ids),
            overrides=overrides,
            seeds=tuple(seeds),
        )

    return Study(experiments=experiments, runs=runs)
