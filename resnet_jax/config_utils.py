"""Configs: resolve and validate one against the base config (resnet_jax/base_config.py).

`resolve` is the single gate every run passes before it loads data or compiles anything: every
key must be one of the base config's (a typo gets the closest name suggested), of its type, and in
range. The optimizer and schedule keys' choices and limits come from optim's registry.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from resnet_jax import augment, autoaugment, base_config, data, models, optim, parallel
from resnet_jax.cpu.kernels import KERNELS
from resnet_jax.errors import ConfigError

# Where users are sent to read what each key means.
BASE_CONFIG = "resnet_jax/base_config.py"
NORMALIZATIONS = ("auto", *augment.NAMED_STATS, "dataset")
RESULTS_CHECKPOINTS = ("best_val", "final")  # workdir.reported_checkpoint's selections
EMA_WEIGHTS = ("ema", "raw")  # builders.reported_weights' selections
FREEZE_HELP = '"none", "backbone", or the number of stages k (the stem and stages 1..k), e.g. "2"'

# Allowed values of the keys that name a choice.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.name": models.MODEL_NAMES,
    "model.stem": models.STEMS,
    "model.shortcut": ("", *models.SHORTCUTS),
    "model.kernels": KERNELS,
    "dataset.pipeline": data.PIPELINES,
    "augment.normalization": NORMALIZATIONS,
    "augment.rotation_interpolation": tuple(augment.INTERPOLATION_ORDER),
    "augment.policy": autoaugment.POLICIES,
    "augment.random_erasing_mode": augment.ERASING_MODES,
    "optimizer.name": optim.OPTIMIZER_NAMES,
    "schedule.name": optim.SCHEDULE_NAMES,
    "parallel": parallel.MODES,
    "results_checkpoint": RESULTS_CHECKPOINTS,
    "ema.weights": EMA_WEIGHTS,
}
# Ranges of the numeric keys: (the requirement as users read it, the test).
LIMITS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model.width": (">= 0 (0 = the family's own)", lambda v: v >= 0),
    "model.drop_path_rate": ("in [0, 1) (0 = off)", lambda v: 0 <= v < 1),
    "dataset.image_size": (">= 0 (0 = as stored)", lambda v: v >= 0),
    "dataset.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "dataset.memory_budget_gb": ("> 0", lambda v: v > 0),
    "dataset.stream_workers": (">= 0 (0 = decode in the main process)", lambda v: v >= 0),
    "augment.crop_padding": (">= 0", lambda v: v >= 0),
    "augment.crop_size": (">= 0 (0 = the image size)", lambda v: v >= 0),
    "augment.rotation": ("in [0, 180] degrees", lambda v: 0 <= v <= 180),
    "augment.cutout": (">= 0", lambda v: v >= 0),
    "augment.resize_to": (">= 0 (0 = no resize)", lambda v: v >= 0),
    "augment.randaugment_num_ops": (">= 0", lambda v: v >= 0),
    "augment.randaugment_magnitude": ("in [0, 30]", lambda v: 0 <= v <= 30),
    "augment.random_erasing": ("in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
    "augment.random_erasing_min_area": ("in (0, 1]", lambda v: 0 < v <= 1),
    "augment.random_erasing_max_area": ("in (0, 1]", lambda v: 0 < v <= 1),
    "augment.random_erasing_min_aspect": ("in (0, 1]", lambda v: 0 < v <= 1),
    "augment.mixup_alpha": (">= 0 (0 = off)", lambda v: v >= 0),
    "augment.cutmix_alpha": (">= 0 (0 = off)", lambda v: v >= 0),
    "augment.mix_prob": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "augment.mix_switch_prob": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "eval_batch_size": (">= 1", lambda v: v >= 1),
    "num_epochs": (">= 0", lambda v: v >= 0),
    "num_steps": (">= 0 (0 = use num_epochs)", lambda v: v >= 0),
    "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "checkpoint_every_epochs": (">= 1", lambda v: v >= 1),
    "keep_checkpoints": (">= 1", lambda v: v >= 1),
    "log_every_steps": (">= 1", lambda v: v >= 1),
    "profile.start_step": (">= 0", lambda v: v >= 0),
    "profile.num_steps": (">= 0 (0 = no trace)", lambda v: v >= 0),
    "ema.decay": ("in [0, 1) (0 = off)", lambda v: 0 <= v < 1),
    **{
        f"{section}.{option.key}": option.limit
        for section in optim.SECTIONS
        for option in optim.config_options(section).values()
        if option.limit
    },
}


def default_config() -> ml_collections.ConfigDict:
    """The base config's `get_config()`: every key, with its default (a fresh copy)."""
    return base_config.get_config()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer.name": "sgd", ...}: every leaf of a (nested) config by its dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def closest_keys(key: str, known: list[str]) -> list[str]:
    """Known dotted keys that `key` may have meant, best first: a similar name in the same
    section or a similar full path, else the same name in another section."""
    section, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    similar = [siblings[s] for s in difflib.get_close_matches(name, list(siblings), cutoff=0.7)]
    similar += difflib.get_close_matches(key, known, n=3, cutoff=0.85)
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    return list(dict.fromkeys(similar or same_name))[:3]


def resolve(config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The complete, validated config: the base config's keys, overridden by `config`.

    Raises ConfigError naming every unknown key (with the closest known ones), wrong type and
    out-of-range value at once.
    """
    defaults = flatten(default_config())
    given = flatten(config)
    problems = [unknown_key_problem(key, list(defaults)) for key in given if key not in defaults]
    merged = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    for key, value in merged.items():
        problem = _type_problem(key, value, defaults[key]) or _value_problem(key, value)
        if problem:
            problems.append(problem)
    if merged["num_epochs"] == 0 and merged["num_steps"] == 0:
        problems.append("num_epochs and num_steps are both 0: set one of them to how long to train")
    problems += _erasing_area_problems(merged)
    if problems:
        raise ConfigError(
            f"The config has {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
            + "; ".join(problems)
            + ". Fix them in the config file or on the command line (--config.KEY=VALUE); "
            f"{BASE_CONFIG} lists every key with its meaning."
        )
    resolved = default_config()
    resolved.update_from_flattened_dict({k: v for k, v in merged.items()})
    return resolved


def _erasing_area_problems(merged: dict[str, Any]) -> list[str]:
    """Random erasing draws its box's area between its min and max."""
    low, high = merged["augment.random_erasing_min_area"], merged["augment.random_erasing_max_area"]
    if not all(isinstance(v, int | float) for v in (low, high)) or low <= high:
        return []  # a wrong type is reported as such
    return [
        f"augment.random_erasing_min_area = {low} is larger than augment.random_erasing_max_area "
        f"= {high}: the erased area is drawn between them, so set min_area <= max_area"
    ]


def unknown_key_problem(key: str, known: list[str]) -> str:
    """ "unknown key K (did you mean ...?)": `key` is not among the `known` dotted keys."""
    suggestions = closest_keys(key, known)
    hint = f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""
    return f"unknown key {key}{hint}"


def _type_problem(key: str, value: Any, default: Any) -> str | None:
    expected = type(default)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif expected is float:
        ok = isinstance(value, int | float)
    elif expected is tuple:
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
    else:
        ok = isinstance(value, expected)
    if ok:
        return None
    return f"{key} = {value!r} is a {type(value).__name__} but must be a {expected.__name__}"


def _value_problem(key: str, value: Any) -> str | None:
    if key in CHOICES and value not in CHOICES[key]:
        choices = ", ".join(repr(c) for c in CHOICES[key])
        return f"{key} = {value!r} is not one of: {choices}"
    if key in LIMITS:
        requirement, holds = LIMITS[key]
        return None if holds(value) else f"{key} = {value!r} must be {requirement}"
    if key == "model.freeze" and not (value in ("none", "backbone") or value.isdigit()):
        return f"model.freeze = {value!r} must be {FREEZE_HELP}"
    if key == "model.pretrained" and value and not Path(value).expanduser().exists():
        return (
            f"model.pretrained = {value!r} does not exist (give a torchvision .pth or .safetensors "
            'file, or a `python -m resnet_jax.convert` output directory; "" trains from scratch)'
        )
    return None


def frozen_stages(config: ml_collections.ConfigDict, num_stages: int) -> int:
    """model.freeze as the model's `frozen_stages`: -1 none, k the stem and stages 1..k."""
    freeze = config.model.freeze
    if freeze == "none":
        return -1
    if freeze == "backbone":
        return num_stages
    if int(freeze) > num_stages:
        raise ConfigError(
            f"model.freeze = {freeze!r} asks for {freeze} stages but {config.model.name} has "
            f'{num_stages}: set it to at most {num_stages!r}, or to "backbone".'
        )
    return int(freeze)


def epochs_replace_steps(config: ml_collections.ConfigDict, given: Collection[str]) -> None:
    """A num_epochs the user gave (one of the keys in `given`) replaces a num_steps set in the
    config file, which would otherwise win (configs/resnet20.py sets 64k iterations)."""
    if "num_epochs" in given and "num_steps" not in given and config.num_steps:
        logging.info(
            "num_epochs=%d given: it replaces the config file's num_steps=%d.",
            config.num_epochs, config.num_steps,
        )  # fmt: skip
        config.num_steps = 0


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config saved with `to_json`, resolved against today's defaults."""
    return resolve(json.loads(text))
