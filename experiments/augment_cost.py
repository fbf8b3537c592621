"""What RandAugment, TrivialAugmentWide and mixup/CutMix cost per train step on this machine.

    .venv/bin/python -m experiments.augment_cost            # resnet18-cifar, batch 128 (~2 min)
    .venv/bin/python -m experiments.augment_cost --quick    # tiny sizes: proves the script runs

Two measurements, each alternating its variants window by window (`harness.alternate`) on one
device-resident uint8 batch: the on-device augmentation alone (preprocess, then the mix, jitted
as the train step runs them) for each variant, and the whole train step (`harness.JaxTrainer` on
resnet18-cifar, as the benchmarks compile it) without and with the heaviest variant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
from absl import app, flags

from experiments import harness
from resnet_jax import augment, cpu

CROP_FLIP = {"mean": augment.CIFAR10_MEAN, "std": augment.CIFAR10_STD, "crop_padding": 4}
VARIANTS: dict[str, tuple[dict[str, Any], augment.Mix | None]] = {
    "crop+flip": ({}, None),
    "+mixup/cutmix": ({}, augment.Mix(mixup_alpha=0.2, cutmix_alpha=1.0)),
    "+randaugment(2, 9)": ({"policy": "randaugment"}, None),
    "+trivialaugment": ({"policy": "trivialaugment"}, None),
    "+trivialaugment+mixup/cutmix": (
        {"policy": "trivialaugment"},
        augment.Mix(mixup_alpha=0.2, cutmix_alpha=1.0),
    ),
}
HEAVIEST = "+trivialaugment+mixup/cutmix"


def augmentation_only(policy: dict[str, Any], mix: augment.Mix | None, images: jax.Array):
    """`run(n)`: seconds per call of the jitted preprocess (+ mix) on `images`."""
    preprocess = augment.make_preprocess(**CROP_FLIP, **policy)

    @jax.jit
    def augmentation(images, rng):
        out = preprocess(images, rng)
        return out if mix is None else mix(out, rng)[0]

    rng = jax.random.key(0)
    return harness.timed(lambda: augmentation(images, rng))


def variant_trainer(
    name: str, batch: dict, policy: dict[str, Any], mix: augment.Mix | None
) -> harness.JaxTrainer:
    """The compiled train step of harness's `name` state with one variant's augmentation."""
    preprocess = augment.make_preprocess(**CROP_FLIP, **policy)
    return harness.JaxTrainer(name, batch, preprocess=preprocess, mix=mix)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program: importing this module adds no
    flags)."""
    flags.DEFINE_enum("model", "resnet18-cifar", list(harness.MODELS), "The train step's model.")
    flags.DEFINE_integer("batch_size", 128, "Images per batch.")
    flags.DEFINE_integer("windows", 3, "Timed windows per variant (median taken).")
    flags.DEFINE_integer("steps", 2, "Steps per timed window.")
    flags.DEFINE_bool("quick", False, "resnet20, batch 8, one window: proves the script runs.")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def settings() -> SimpleNamespace:
    """The flags' values, with --quick's in place of the sizes (they win)."""
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.quick:
        args.model, args.batch_size, args.windows, args.steps = "resnet20", 8, 1, 1
    return args


def main(argv: list[str]) -> None:
    """Times the variants, prints them and writes the JSON."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}. Run with --help to see the flags.")
    cpu.setup_if_cpu()  # before JAX starts a backend, as the command lines do
    args = settings()
    batch = harness.host_batch(args.batch_size, uint8=True)
    images = jax.device_put(batch["image"])
    alone = harness.alternate(
        {name: augmentation_only(*spec, images) for name, spec in VARIANTS.items()},
        args.windows,
        args.steps,
    )
    steps = {
        name: variant_trainer(args.model, batch, *VARIANTS[name])
        for name in ("crop+flip", HEAVIEST)
    }
    step_times = harness.alternate(steps, args.windows, args.steps)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "load_average": os.getloadavg()[0],
        "augmentation_ms": {name: 1000 * alone[name] for name in VARIANTS},
        "step_ms": {name: 1000 * step_times[name] for name in steps},
    }
    print(f"{args.model}, batch {args.batch_size}, load average {result['load_average']:.1f}")
    for name, ms in result["augmentation_ms"].items():
        print(f"  augmentation alone  {name:30s} {ms:8.1f} ms/batch")
    for name, ms in result["step_ms"].items():
        print(f"  train step          {name:30s} {ms:8.1f} ms/step")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
