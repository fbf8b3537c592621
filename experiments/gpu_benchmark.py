"""The train step on one GPU against torchvision + PyTorch, eager and under torch.compile.

    python3 -m experiments.gpu_benchmark --json result.json            # the rows below, on a GPU
    JAX_PLATFORMS=cpu python3 -m experiments.gpu_benchmark --quick     # tiny sizes on the CPU

Rows, in this order (the most wanted first, so a run cut short keeps them):
    resnet50-224-bf16     ResNet-50, ImageNet stem, 224x224, batch 256, 1000 classes, bfloat16
    resnet18-cifar-bf16   ResNet-18, CIFAR stem, 32x32, batch 512, 10 classes, bfloat16
    resnet50-224-fp32     as the first row in float32

One process measures everything, on synthetic device-resident batches (the same random images on
both sides). The JAX side is what users run on an accelerator: `models.get_model(...,
kernels="xla")` (plain Flax; "auto" resolves to it on a GPU), `dtype=bfloat16` for the bf16 rows
(params float32), and a `train_state.TrainStep` compiled ahead of time by
`parallel.Parallel("jit").compile_train_step(step)` with the state donated. The PyTorch side is
torchvision's same model, channels-last, bf16 autocast for the bf16 rows, SGD with the same
hyperparameters, `cudnn.benchmark` on; once eager and once with the model under `torch.compile`
(default mode; the optimizer step stays eager). Both sides are `experiments.harness`'s, as in the
CPU benchmark. The three sides alternate window by window (`harness.alternate`), each figure is
the median over the timed windows after warm-up, and every window ends with `block_until_ready` /
`torch.cuda.synchronize`.

Reported per row: images/s of each side, JAX's speed as a multiple of each torch side's, JAX's
ahead-of-time compile time, torch.compile's first step (compilation included), TFLOP per step from
XLA's cost analysis of the compiled step, and model FLOPs utilization: those FLOPs per second
over the bf16 matmul rate measured in the same run (an 8192^3 bf16 matmul in JAX, random data).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# JAX takes 75% of the GPU's memory at start by default; PyTorch shares the GPU in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import harness


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration: `model` is a key of harness.MODELS."""

    name: str
    model: str
    image_size: int
    batch_size: int
    num_classes: int
    bf16: bool


ROWS = (
    Row("resnet50-224-bf16", "resnet50", 224, 256, 1000, bf16=True),
    Row("resnet18-cifar-bf16", "resnet18-cifar", 32, 512, 10, bf16=True),
    Row("resnet50-224-fp32", "resnet50", 224, 256, 1000, bf16=False),
)
# --quick: the same rows at sizes a 2-core CPU runs in seconds.
QUICK_SIZES = {"resnet50": (32, 2), "resnet18-cifar": (8, 4)}
TORCH_SIDES = ("torch_eager", "torch_compile")


# ----------------------------------------------------------------------------------------------
# The chip's matmul rate


def bf16_matmul_tflop_s(size: int, windows: int, window_s: float) -> float:
    """TFLOP/s of a (size x size) @ (size x size) bfloat16 matmul in JAX, median of windows."""
    key_a, key_b = jax.random.split(jax.random.key(1))
    a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
    b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    run = harness.timed(lambda: matmul(a, b))
    steps = steps_per_window(run, window_s)
    seconds = harness.alternate({"matmul": run}, windows, steps)["matmul"]
    return 2.0 * size**3 / seconds / 1e12


def steps_per_window(run: harness.Runner, window_s: float) -> int:
    """How many steps make a timed window last about `window_s` (from two timed steps)."""
    return max(1, round(window_s / run(2)))


# ----------------------------------------------------------------------------------------------
# One row


def bench_row(row: Row, args: SimpleNamespace, matmul_tflop_s: float) -> dict[str, Any]:
    """Builds the three sides of `row`, alternates their timed windows and returns the figures."""
    image_size, batch_size = (
        QUICK_SIZES[row.model] if args.quick else (row.image_size, row.batch_size)
    )
    result: dict[str, Any] = dataclasses.asdict(row) | {
        "image_size": image_size,
        "batch_size": batch_size,
    }
    batch = harness.host_batch(batch_size, image_size, row.num_classes)
    dtype = jnp.bfloat16 if row.bf16 else jnp.float32
    runners: dict[str, harness.Runner] = {}
    torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    jax_side = harness.JaxTrainer(
        row.model, batch, num_classes=row.num_classes, dtype=dtype, kernels="xla", warmup_steps=2
    )
    runners["jax"] = jax_side
    flops = jax_side.flops()
    result |= {"jax_compile_s": jax_side.compile_s, "step_tflop": flops / 1e12}
    progress(f"{row.name}: JAX compiled in {jax_side.compile_s:.1f} s")
    for side, backend in zip(TORCH_SIDES, (None, args.torch_compile_backend), strict=True):
        try:
            trainer = harness.TorchTrainer(
                row.model, batch, num_classes=row.num_classes, bf16=row.bf16, device=torch_device,
                compile_backend=backend, warmup_steps=2,
            )  # fmt: skip
        except Exception as error:  # one failing side must not cost the run the others
            traceback.print_exc()
            result[f"{side}_error"] = describe(error)
            continue
        runners[side] = trainer
        result[f"{side}_first_step_s"] = trainer.first_step_s
        progress(f"{row.name}: {side} first step {trainer.first_step_s:.1f} s")
    steps = steps_per_window(jax_side, args.window_s)
    times = harness.alternate(runners, args.windows, steps)
    result |= {"steps_per_window": steps, "windows_s": {s: times[f"{s}_windows"] for s in runners}}
    for side in runners:
        result[f"{side}_img_s"] = batch_size / times[side]
        result[f"{side}_mfu"] = flops / times[side] / 1e12 / matmul_tflop_s
    for side in TORCH_SIDES:
        if side in runners:
            result[f"vs_{side}"] = times[side] / times["jax"]
    return result


def describe(error: Exception) -> str:
    """An exception in one table cell: its type and first line (the traceback goes to stderr)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}".replace("|", "/")


def release_memory() -> None:
    """Frees one row's device memory before the next row builds its own."""
    gc.collect()
    jax.clear_caches()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The report


def machine(args: SimpleNamespace) -> dict[str, Any]:
    """`harness.machine()` and the settings that decide what each side's numbers mean."""
    import torch

    return harness.machine() | {
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "torch_compile_backend": args.torch_compile_backend,
        "torch_cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_tf32_conv": torch.backends.cudnn.allow_tf32,
        "torch_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }


def table(result: dict[str, Any]) -> str:
    """The markdown table of `result`'s rows (a failed side shows as "-")."""
    lines = [
        "| row | image | batch | JAX img/s | torch eager img/s | torch.compile img/s | "
        "**JAX / eager** | **JAX / compile** | JAX compile s | torch.compile 1st step s | "
        "TFLOP/step | MFU JAX / eager / compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(row: dict[str, Any], key: str, spec: str) -> str:
        return format(row[key], spec) if key in row else "-"

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        mfu = " / ".join(fmt(r, f"{side}_mfu", ".0%") for side in ("jax", *TORCH_SIDES))
        lines.append(
            f"| {r['name']} | {r['image_size']} | {r['batch_size']} | {fmt(r, 'jax_img_s', '.0f')} "
            f"| {fmt(r, 'torch_eager_img_s', '.0f')} | {fmt(r, 'torch_compile_img_s', '.0f')} | "
            f"**{fmt(r, 'vs_torch_eager', '.2f')}x** | **{fmt(r, 'vs_torch_compile', '.2f')}x** | "
            f"{fmt(r, 'jax_compile_s', '.1f')} | {fmt(r, 'torch_compile_first_step_s', '.1f')} | "
            f"{fmt(r, 'step_tflop', '.3g')} | {mfu} |"
        )
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"\nDevice: {m['device']} ({m['backend']}); jax {m['jax']}, flax {m['flax']}, "
        f"torch {m['torch']}, torchvision {m['torchvision']}, cuDNN {m['cudnn']}; "
        f"torch.compile backend {m['torch_compile_backend']}"
    )
    print(
        f"bf16 matmul {result['matmul_size']}^3 in JAX: {result['matmul_tflop_s']:.1f} TFLOP/s "
        "(the MFU denominator)"
    )
    print(f"Command: {result['command']}\n")
    print(table(result))
    for r in result["rows"]:
        for key in (k for k in r if k.endswith("_error")):
            print(f"{r['name']}: {key.removesuffix('_error')} failed: {r[key]}")
    sys.stdout.flush()


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


FLAGS = flags.FLAGS
ROW_NAMES = [row.name for row in ROWS]


def define_flags() -> None:
    """The command line (defined only when run as a program: importing this module adds no
    flags)."""
    flags.DEFINE_list("rows", ROW_NAMES, f"Rows, comma-separated, of: {', '.join(ROW_NAMES)}.")
    flags.register_validator(
        "rows", lambda rows: set(rows) <= set(ROW_NAMES), f"takes rows of: {', '.join(ROW_NAMES)}"
    )
    flags.DEFINE_integer("windows", 5, "Timed windows per side (median taken).")
    flags.DEFINE_float("window_s", 0.5, "About how long one window lasts, seconds.")
    flags.DEFINE_integer("matmul_size", 8192, "Size of the bf16 matmul that gives the chip's rate.")
    flags.DEFINE_string("torch_compile_backend", "inductor", "torch.compile's backend.")
    flags.DEFINE_bool(
        "quick", False,
        "Tiny images and batches, 2 short windows, torch.compile on aot_eager: proves the script "
        "runs (on the CPU too).",
    )  # fmt: skip
    flags.DEFINE_string("json", "", "Write the results here, rewritten after each row.")


def settings() -> SimpleNamespace:
    """The flags' values, with --quick's in place of the sizes (they win)."""
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.quick:
        args.windows, args.window_s, args.matmul_size = 2, 0.0, 256
        # Inductor would compile C++ for minutes on a small CPU; aot_eager traces the same graphs.
        if args.torch_compile_backend == "inductor":
            args.torch_compile_backend = "aot_eager"
    return args


def main(argv: list[str]) -> None:
    """Measures the rows, printing and writing each as it is done, then the report."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}. Run with --help to see the flags.")
    args = settings()
    import torch

    torch.backends.cudnn.benchmark = True  # as PyTorch's ImageNet recipes run
    result: dict[str, Any] = {
        "machine": machine(args),
        "command": " ".join(["python3", "-m", "experiments.gpu_benchmark", *sys.argv[1:]]),
        "matmul_size": args.matmul_size,
        "rows": [],
    }
    result["matmul_tflop_s"] = bf16_matmul_tflop_s(args.matmul_size, args.windows, args.window_s)
    progress(f"bf16 matmul: {result['matmul_tflop_s']:.1f} TFLOP/s")
    for row in (row for row in ROWS if row.name in args.rows):
        progress(f"{row.name} ...")
        try:
            result["rows"].append(bench_row(row, args, result["matmul_tflop_s"]))
        except Exception as error:  # a row that fails is a finding; the next row still runs
            traceback.print_exc()
            result["rows"].append({"name": row.name, "error": describe(error)})
        release_memory()
        print(table(result).splitlines()[-1], flush=True)
        if args.json:  # after every row, so a run cut short by its timeout keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=1))
    print_report(result)


if __name__ == "__main__":
    define_flags()
    app.run(main)
