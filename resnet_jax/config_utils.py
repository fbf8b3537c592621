"""Configs: resolve and validate one against configs/default.py, and run a CLI on it.

`resolve` is the single gate every run passes before it loads data or compiles anything: every
key must be one of default.py's (a typo gets the closest name suggested), of its type, and in
range. `run_cli` wraps `absl.app.run` so that a mistake a user can make (a bad flag, a config
problem, missing data, ...) ends in one paragraph on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging as pylogging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging

from resnet_jax import cpu, models, optim, parallel

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
NORMALIZATIONS = ("auto", "cifar10", "imagenet")
FREEZE_HELP = '"none", "backbone", or the number of stages k (the stem and stages 1..k), e.g. "2"'

# Allowed values of the keys that name a choice.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.name": models.MODEL_NAMES,
    "model.stem": models.STEMS,
    "model.shortcut": ("", *models.SHORTCUTS),
    "augment.normalization": NORMALIZATIONS,
    "optimizer.name": optim.OPTIMIZER_NAMES,
    "schedule.name": optim.SCHEDULE_NAMES,
    "parallel": parallel.MODES,
}
# Ranges of the numeric keys: (the requirement as users read it, the test).
LIMITS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model.width": (">= 0 (0 = the family's own)", lambda v: v >= 0),
    "dataset.image_size": (">= 0 (0 = as stored)", lambda v: v >= 0),
    "dataset.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "augment.crop_padding": (">= 0", lambda v: v >= 0),
    "augment.crop_size": (">= 0 (0 = the image size)", lambda v: v >= 0),
    "augment.rotation": ("in [0, 180] degrees", lambda v: 0 <= v <= 180),
    "augment.cutout": (">= 0", lambda v: v >= 0),
    "augment.resize_to": (">= 0 (0 = no resize)", lambda v: v >= 0),
    "optimizer.learning_rate": ("> 0 (the peak rate for 128 images)", lambda v: v > 0),
    "optimizer.momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.weight_decay": (">= 0", lambda v: v >= 0),
    "optimizer.grad_clip_norm": (">= 0 (0 = no clipping)", lambda v: v >= 0),
    "optimizer.b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.eps": ("> 0", lambda v: v > 0),
    "optimizer.decay": ("in [0, 1)", lambda v: 0 <= v < 1),
    "schedule.warmup_epochs": (">= 0", lambda v: v >= 0),
    "schedule.final_lr_fraction": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "schedule.boundaries_epochs": (
        "increasing epochs > 0, e.g. (100, 150)",
        lambda v: all(b > 0 for b in v) and list(v) == sorted(set(v)),
    ),
    "schedule.decay_factor": ("> 0", lambda v: v > 0),
    "schedule.decay_rate": ("> 0", lambda v: v > 0),
    "schedule.decay_epochs": (">= 0 (0 = the whole run)", lambda v: v >= 0),
    "schedule.decay_per_epoch": (">= 0", lambda v: v >= 0),
    "batch_size": (">= 1", lambda v: v >= 1),
    "eval_batch_size": (">= 1", lambda v: v >= 1),
    "num_epochs": (">= 0", lambda v: v >= 0),
    "num_steps": (">= 0 (0 = use num_epochs)", lambda v: v >= 0),
    "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "checkpoint_every_epochs": (">= 1", lambda v: v >= 1),
    "keep_checkpoints": (">= 1", lambda v: v >= 1),
    "log_every_steps": (">= 1", lambda v: v >= 1),
}


class ConfigError(ValueError):
    """A config (or workdir) problem the user can fix; the message says how."""


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's `get_config()`: every key, with its default (a fresh copy)."""
    return _default_module().get_config()


@functools.cache
def _default_module() -> Any:
    # Loaded by path, so the defaults are found whatever the working directory.
    spec = importlib.util.spec_from_file_location("configs.default", CONFIGS_DIR / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """The complete, validated config: default.py's keys, overridden by `config`.

    Raises ConfigError naming every unknown key (with the closest known ones), wrong type and
    out-of-range value at once.
    """
    defaults = flatten(default_config())
    given = flatten(config)
    problems = [_unknown_key_problem(key, list(defaults)) for key in given if key not in defaults]
    merged = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    for key, value in merged.items():
        problem = _type_problem(key, value, defaults[key]) or _value_problem(key, value)
        if problem:
            problems.append(problem)
    if merged["num_epochs"] == 0 and merged["num_steps"] == 0:
        problems.append("num_epochs and num_steps are both 0: set one of them to how long to train")
    if problems:
        raise ConfigError(
            f"The config has {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
            + "; ".join(problems)
            + ". Fix them in the config file or on the command line (--config.KEY=VALUE); "
            "configs/default.py lists every key with its meaning."
        )
    resolved = default_config()
    resolved.update_from_flattened_dict({k: v for k, v in merged.items()})
    return resolved


def _unknown_key_problem(key: str, known: list[str]) -> str:
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


def ignored_options(
    config: ml_collections.ConfigDict, section: str, keys: list[str], used: set[str]
) -> list[str]:
    """`section.key=value` for each option in `keys` that the chosen name does not use but that
    was changed from its default (so a user sees it had no effect)."""
    defaults = default_config()[section]
    return [
        f"{section}.{key}={config[section][key]!r}"
        for key in keys
        if key not in used and config[section][key] != defaults[key]
    ]


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config saved with `to_json`, resolved against today's defaults."""
    return resolve(json.loads(text))


# --- command lines -------------------------------------------------------------------------------


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> NoReturn:
    """`absl.app.run(main)` where a user's mistake ends in one paragraph on stderr and exit 1.

    User mistakes are flag and config-file errors and the project's own ValueError subclasses
    (ConfigError, data.DataError, parallel.ParallelError, convert.ConversionError, ...); anything
    else is a bug and keeps its traceback.
    """
    cpu.setup_if_cpu()  # before JAX starts a backend: XLA reads its flags then
    # Config files import each other as `from configs import default`, from any working directory.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))

    quiet_library_info()

    def main_explaining_errors(args: list[str]) -> int | None:
        try:
            return main(args)
        except ValueError as error:
            if not is_user_error(error):
                raise
            exit_with_message(str(error))

    app.run(main_explaining_errors, argv=argv, flags_parser=_parse_flags_explaining_errors)
    raise AssertionError("app.run returns only by exiting")


def quiet_library_info() -> None:
    """Keep libraries' routine INFO lines (orbax, tfds) out of a command's log."""
    logging.get_absl_handler().addFilter(_only_our_info)


def _only_our_info(record: pylogging.LogRecord) -> bool:
    # Libraries (orbax, tfds) log routine INFO through absl too; keep theirs from WARNING up.
    return record.levelno >= pylogging.WARNING or f"{os.sep}resnet_jax{os.sep}" in record.pathname


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one of this project's ValueError subclasses, which explain themselves."""
    kind = type(error)
    # "__main__": the errors of the module run with `python -m`.
    ours = kind.__module__.startswith("resnet_jax.") or kind.__module__ == "__main__"
    return isinstance(error, ValueError) and kind is not ValueError and ours


def exit_with_message(message: str) -> NoReturn:
    """Print `message` as one paragraph on stderr and exit with status 1."""
    text = " ".join(message.split())
    # Paths and flags stay whole, so they can be copied from the message.
    paragraph = textwrap.fill(
        f"Error: {text}", width=100, break_long_words=False, break_on_hyphens=False
    )
    print(f"\n{paragraph}\n", file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags_explaining_errors(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a config file that failed to load raises only when read
        return remaining
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
        exit_with_message(_explain_flag_error(error, argv))


def _explain_flag_error(error: Exception, argv: list[str]) -> str:
    known = list(flatten(default_config()))
    overrides = [m.group(1) for a in argv if (m := re.match(r"^--?(?:no)?config\.([\w.]+)", a))]
    unknown = [key for key in overrides if key not in known]
    if unknown:
        return (
            "Unknown config key"
            + ("s " if len(unknown) > 1 else " ")
            + "; ".join(
                _unknown_key_problem(key, known).removeprefix("unknown key ") for key in unknown
            )
            + ". configs/default.py lists every key with its meaning."
        )
    detail = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = detail[-1] if detail else type(error).__name__
    if "Could not override field" in str(error):  # the file sets a key to another type
        return (
            f"The config file sets a key to a value of the wrong type: {reason}. Fix the value in "
            "the config file; configs/default.py lists every key with its type and meaning."
        )
    if "Error whilst parsing config file" in str(error) or isinstance(error, OSError):
        configs = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.py")))
        return (
            f"Cannot load the config file: {reason}. Pass an existing config file that defines "
            f"get_config(), e.g. --config=configs/r50.py (the configs in {CONFIGS_DIR}: {configs})."
        )
    return f"{reason}. Run with --helpfull to see every flag."
