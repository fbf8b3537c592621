"""Training and eval throughput of resnet_jax against torchvision + PyTorch on this machine.

    .venv/bin/python -m experiments.benchmark                    # the table in docs/PERFORMANCE.md
    .venv/bin/python -m experiments.benchmark --quick            # tiny sizes: a smoke test (~1 min)
    make bench ARGS="--models resnet18-cifar --windows 7"

Every comparison is measured in one process and alternates: JAX window, torch window, torch,
JAX, ... (the order flips each round so a drifting machine load hits both sides alike), and each
side's figure is the median over windows after warm-up. On a shared machine absolute times drift by
2x from minute to minute; the ratios measured side by side are what to read. The 1-minute load
average is printed with each model so a noisy run shows as one.

What runs on each side, and how it is timed, is `experiments.harness`'s (shared with the GPU
benchmark): on the JAX side what users run, a `train_state.TrainStep` compiled by
`parallel.Parallel("jit").compile_train_step(step)` (state donated), on batches placed with
`shard_batch`. FLOPs come from XLA's `cost_analysis()` of the same step with the model on plain
Flax (kernels="xla": the same arithmetic; XLA cannot see into oneDNN's calls); GFLOP/s are set
against a float32 GEMM timed in the same run. On one CPU device the model runs on the CPU kernel
set (`get_model`'s kernels="auto"), and the process gets the CPU settings of
`resnet_jax.cpu.setup()` at start-up, as the command lines do. Compile time, warm start from the
persistent compilation cache and peak memory (ru_maxrss) are measured in fresh subprocesses of
this script.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from experiments import harness
from resnet_jax import augment, cpu, data
from resnet_jax.cpu import kernels, onednn

REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m experiments.benchmark` runs


# ----------------------------------------------------------------------------------------------
# The GEMM peak


def gemm_peak(size: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a (size x size) @ (size x size) float32 matmul, JAX and torch, median of runs."""
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    matmul = jax.jit(jnp.matmul)
    ta = torch.from_numpy(np.array(a))
    jax_run, torch_run = harness.timed(lambda: matmul(a, a)), harness.timed(lambda: ta @ ta)

    result = harness.alternate({"jax": jax_run, "torch": torch_run}, repeats, 3)
    flops = 2.0 * size**3
    return {"jax": flops / result["jax"] / 1e9, "torch": flops / result["torch"] / 1e9}


# ----------------------------------------------------------------------------------------------
# Subprocess measurements: cold compile, warm start from the persistent cache, peak memory


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), MiB, from /proc.

    Not ru_maxrss: a child started by fork+exec inherits the parent's high-water mark there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else 0.0


def child_main(args: SimpleNamespace) -> None:
    """Runs in a fresh process: prints one JSON line for the parent."""
    start = time.perf_counter()
    if args.child == "torch":
        import torchvision  # noqa: F401  (imported before the baseline, as jax already is)
    baseline = rss_mib()  # count what the run adds to the imported framework
    if args.child == "torch":
        trainer = harness.TorchTrainer(args.model, harness.host_batch(args.batch_size))
        trainer(2)
        out: dict[str, Any] = {}
    else:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        trainer = harness.JaxTrainer(args.model, harness.host_batch(args.batch_size))
        first_step = time.perf_counter() - start
        trainer(2)
        out = {"compile_s": trainer.compile_s, "first_step_s": first_step}
    out["peak_rss_mib"] = rss_mib("VmHWM")
    out["added_rss_mib"] = out["peak_rss_mib"] - baseline
    print("RESULT " + json.dumps(out), flush=True)


def run_child(kind: str, model: str, batch_size: int, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.benchmark", f"--child={kind}", f"--models={model}",
           f"--batch_size={batch_size}", f"--cache_dir={cache_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"benchmark child {kind} {model} failed:\n{proc.stderr[-3000:]}")


def startup_and_memory(model: str, batch_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="resnet_jax_cache_") as cache_dir:
        cold = run_child("jax", model, batch_size, cache_dir)
        warm = run_child("jax", model, batch_size, cache_dir)
    torch_side = run_child("torch", model, batch_size, "")
    return {
        "compile_cold_s": cold["compile_s"],
        "compile_warm_s": warm["compile_s"],
        "first_step_cold_s": cold["first_step_s"],
        "first_step_warm_s": warm["first_step_s"],
        "peak_rss_mib": cold["peak_rss_mib"],
        "added_rss_mib": cold["added_rss_mib"],
        "torch_peak_rss_mib": torch_side["peak_rss_mib"],
        "torch_added_rss_mib": torch_side["added_rss_mib"],
    }


# ----------------------------------------------------------------------------------------------
# The input-pipeline check


def pipeline_check(name: str, batch_size: int, windows: int, steps: int) -> dict[str, Any]:
    """Step time on one device-resident float batch against the real feed: host uint8 batches
    from `data.train_batches` over in-memory arrays, placed per step, augmented on the device."""
    num_examples = batch_size * 16
    rng = np.random.default_rng(1)
    split = data.Split(
        rng.integers(0, 256, (num_examples, harness.IMAGE_SIZE, harness.IMAGE_SIZE, 3), np.uint8),
        rng.integers(0, harness.NUM_CLASSES, num_examples, dtype=np.int32),
    )
    preprocess = augment.make_preprocess(
        mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, crop_padding=4, flip=True
    )

    def batches():
        epoch = 0
        while True:
            yield from data.train_batches(split, batch_size, seed=0, epoch=epoch)
            epoch += 1

    plain = harness.JaxTrainer(name, harness.host_batch(batch_size))
    fed = harness.JaxTrainer(
        name, harness.host_batch(batch_size, uint8=True), preprocess=preprocess
    )
    feed = batches()
    times = harness.alternate(
        {"device_batch": plain, "pipeline": lambda n: fed(n, feed), "augment_only": fed},
        windows,
        steps,
    )
    return {
        "what": "crop(pad 4)+flip+normalize on device",
        "device_batch_s": times["device_batch"],
        "augment_only_s": times["augment_only"],
        "pipeline_s": times["pipeline"],
        "overhead": times["pipeline"] / times["device_batch"] - 1.0,
        "augment_overhead": times["augment_only"] / times["device_batch"] - 1.0,
    }


# ----------------------------------------------------------------------------------------------
# The report


# resnet18-cifar's 3x3 convs, (input size, in channels, out channels, stride): one stride-1 conv
# per stage, then the strided first conv of stages 2-4.
CONV_LAYERS = (
    (32, 64, 64, 1), (16, 128, 128, 1), (8, 256, 256, 1), (4, 512, 512, 1),
    (32, 64, 128, 2), (16, 128, 256, 2), (8, 256, 512, 2),
)  # fmt: skip
QUICK_CONV_LAYERS = ((8, 8, 8, 1), (8, 8, 8, 2))
CONV_PASSES = ("forward", "input_grad", "kernel_grad")


def conv_layers(batch_size: int, windows: int, quick: bool) -> list[dict[str, Any]]:
    """GFLOP/s of resnet18-cifar's 3x3 convs (`CONV_LAYERS`), forward, input gradient and kernel
    gradient: XLA's conv, the oneDNN conv resnet_jax uses, and torch's (channels-last)."""
    rows = []
    for size, c_in, c_out, stride in QUICK_CONV_LAYERS if quick else CONV_LAYERS:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch_size, size, size, c_in), np.float32)
        w = rng.standard_normal((3, 3, c_in, c_out), np.float32) * 0.05
        sides = {"xla": _jax_conv_passes(x, w, stride, "xla")}
        if onednn.available():
            sides["onednn"] = _jax_conv_passes(x, w, stride, "onednn")
        sides["torch"] = _torch_conv_passes(x, w, stride)
        out = (size - 1) // stride + 1  # padding 1
        flops = 2.0 * batch_size * out * out * c_in * c_out * 9
        layer = f"{size}x{size}x{c_in}" + (f", stride {stride} to {c_out}" if stride > 1 else "")
        for kind in CONV_PASSES:
            times = harness.alternate(
                {side: passes[kind] for side, passes in sides.items()}, windows, 2
            )
            rows.append(
                {"layer": layer, "pass": kind}
                | {f"{side}_gflop_s": flops / times[side] / 1e9 for side in sides}
            )
    return rows


def _jax_conv_passes(x: np.ndarray, w: np.ndarray, stride: int, kind: str) -> dict[str, Callable]:
    pad, strides = ((1, 1), (1, 1)), (stride, stride)
    x, w = jnp.asarray(x), jnp.asarray(w)

    def conv(x, w):
        if kind == "onednn":
            return onednn.conv(x, w, strides, pad)
        return lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=kernels.NHWC)

    dy = jnp.ones(jax.eval_shape(conv, x, w).shape, x.dtype)

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    kernel_grad = jax.jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    return {
        "forward": harness.timed(lambda: forward(x, w)),
        "input_grad": harness.timed(lambda: input_grad(x, w)),
        "kernel_grad": harness.timed(lambda: kernel_grad(x, w)),
    }


def _torch_conv_passes(x: np.ndarray, w: np.ndarray, stride: int) -> dict[str, Callable]:
    import torch

    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC memory: channels-last
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    dy = torch.ones_like(torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1))

    def backward(mask: list[bool]):
        args = (dy, tx, tw, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)
        return harness.timed(lambda: torch.ops.aten.convolution_backward(*args))

    return {
        "forward": harness.timed(
            lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)
        ),
        "input_grad": backward([True, False, False]),
        "kernel_grad": backward([False, True, False]),
    }


def machine() -> dict[str, Any]:
    """`harness.machine()` and the kernel set and convs a CPU step runs here."""
    return harness.machine() | {
        "kernels": kernels.resolve_kernels("auto"),
        "convs": "oneDNN" if onednn.available() else "XLA",
    }


def bench_model(name: str, kernels: str, args: SimpleNamespace, peak: float) -> dict[str, Any]:
    batch, images = args.batch_size, harness.host_batch(args.batch_size)
    jax_train = harness.JaxTrainer(name, images, kernels=kernels)
    torch_train = harness.TorchTrainer(name, images)
    train = harness.alternate({"jax": jax_train, "torch": torch_train}, args.windows, args.steps)
    jax_eval, torch_eval = jax_train.evaluator(), torch_train.evaluator()
    evals = harness.alternate({"jax": jax_eval, "torch": torch_eval}, args.windows, args.steps)
    flops = jax_train.flops()
    row: dict[str, Any] = {
        "model": name,
        "kernels": jax_train.kernels,
        "batch_size": batch,
        "jax_train_img_s": batch / train["jax"],
        "torch_train_img_s": batch / train["torch"],
        "train_ratio": train["torch"] / train["jax"],
        # The fastest window of each side: closest to what a quiet machine would show.
        "train_ratio_best": min(train["torch_windows"]) / min(train["jax_windows"]),
        "jax_eval_img_s": batch / evals["jax"],
        "torch_eval_img_s": batch / evals["torch"],
        "eval_ratio": evals["torch"] / evals["jax"],
        "gflop_per_step": flops / 1e9,
        "jax_gflop_s": flops / train["jax"] / 1e9,
        "fraction_of_gemm_peak": flops / train["jax"] / 1e9 / peak,
        "windows": {"jax": train["jax_windows"], "torch": train["torch_windows"]},
        "load_avg_1min": os.getloadavg()[0],
    }
    if args.bf16:
        jax_bf16 = harness.JaxTrainer(name, images, dtype=jnp.bfloat16, kernels=kernels)
        torch_bf16 = harness.TorchTrainer(name, images, bf16=True)
        half = harness.alternate({"jax": jax_bf16, "torch": torch_bf16}, args.windows, args.steps)
        row |= {
            "jax_bf16_train_img_s": batch / half["jax"],
            "torch_bf16_train_img_s": batch / half["torch"],
            "bf16_ratio": half["torch"] / half["jax"],
            "bf16_ratio_best": min(half["torch_windows"]) / min(half["jax_windows"]),
        }
    if not args.no_subprocess and kernels == "auto":
        row |= startup_and_memory(name, batch)
    return row


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"\nMachine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} ({m['backend']}), "
        f"torch {m['torch']}; XLA_FLAGS={m['xla_flags']!r}; kernels: {m['kernels']}; "
        f"convs: {m['convs']}"
    )
    g = result["gemm_gflop_s"]
    print(
        f"float32 GEMM {result['gemm_size']}^3: JAX {g['jax']:.0f} GFLOP/s, "
        f"torch {g['torch']:.0f} GFLOP/s"
    )
    print(f"Command: {result['command']}\n")
    print(
        "| model | kernels | batch | train img/s JAX | train img/s torch | **train ratio** "
        "(fastest windows) | eval img/s JAX | eval img/s torch | eval ratio | GFLOP/step | JAX "
        "GFLOP/s (% of GEMM) | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['model']} | {r['kernels']} | {r['batch_size']} | {r['jax_train_img_s']:.1f} | "
            f"{r['torch_train_img_s']:.1f} | **{r['train_ratio']:.2f}x** "
            f"({r['train_ratio_best']:.2f}x) | "
            f"{r['jax_eval_img_s']:.0f} | {r['torch_eval_img_s']:.0f} | {r['eval_ratio']:.2f}x | "
            f"{r['gflop_per_step']:.1f} | {r['jax_gflop_s']:.0f} "
            f"({100 * r['fraction_of_gemm_peak']:.0f}%) | {r['load_avg_1min']:.1f} |"
        )
    if any("bf16_ratio" in r for r in result["rows"]):
        print(
            "\n| model | kernels | bf16 train img/s JAX | bf16 autocast img/s torch | bf16 ratio "
            "(fastest windows) |"
        )
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            if "bf16_ratio" in r:
                print(
                    f"| {r['model']} | {r['kernels']} | {r['jax_bf16_train_img_s']:.1f} | "
                    f"{r['torch_bf16_train_img_s']:.1f} | {r['bf16_ratio']:.2f}x "
                    f"({r['bf16_ratio_best']:.2f}x) |"
                )
    if any("compile_cold_s" in r for r in result["rows"]):
        print(
            "\n| model | compile cold s | compile warm (cache) s | start to first step cold / "
            "warm s | peak RSS MiB JAX (run's own) | peak RSS MiB torch (run's own) |"
        )
        print("|---|---|---|---|---|---|")
        for r in result["rows"]:
            if "compile_cold_s" in r:
                print(
                    f"| {r['model']} | {r['compile_cold_s']:.1f} | {r['compile_warm_s']:.2f} | "
                    f"{r['first_step_cold_s']:.1f} / {r['first_step_warm_s']:.1f} | "
                    f"{r['peak_rss_mib']:.0f} ({r['added_rss_mib']:.0f}) | "
                    f"{r['torch_peak_rss_mib']:.0f} ({r['torch_added_rss_mib']:.0f}) |"
                )
    p = result.get("pipeline")
    if p:
        print(
            f"\nInput pipeline ({p['model']}, batch {p['batch_size']}, {p['what']}): "
            f"device-resident batch {1000 * p['device_batch_s']:.0f} ms/step, "
            f"+augment {1000 * p['augment_only_s']:.0f} ms/step "
            f"({100 * p['augment_overhead']:+.1f}%), full pipeline "
            f"{1000 * p['pipeline_s']:.0f} ms/step ({100 * p['overhead']:+.1f}%; "
            f"budget 3%: {'OK' if p['overhead'] < 0.03 else 'OVER'})"
        )
    layers = result.get("conv_layers")
    if layers:
        sides = [k.removesuffix("_gflop_s") for k in layers[0] if k.endswith("_gflop_s")]
        print("\nSingle 3x3 convs, GFLOP/s (batch x size x size x channels):")
        print("| layer | pass | " + " | ".join(sides) + " |")
        print("|---|---|" + "---|" * len(sides))
        for r in layers:
            values = " | ".join(f"{r[f'{k}_gflop_s']:.0f}" for k in sides)
            print(f"| {r['layer']} | {r['pass']} | {values} |")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program: importing this module adds no
    flags)."""
    flags.DEFINE_list(
        "models", list(harness.MODELS), f"Models, comma-separated, of: {', '.join(harness.MODELS)}."
    )
    flags.register_validator(
        "models",
        lambda names: set(names) <= set(harness.MODELS),
        f"takes models of: {', '.join(harness.MODELS)}",
    )
    flags.DEFINE_list(
        "kernels", ["auto"], "Kernel sets (model.kernels: auto, cpu, xla), one row each."
    )
    flags.register_validator(
        "kernels",
        lambda sets: set(sets) <= set(kernels.KERNELS),
        f"takes kernel sets of: {', '.join(kernels.KERNELS)}",
    )
    flags.DEFINE_enum(
        "max_isa", "", ["", *cpu.ISA_CAPS],
        "Hold oneDNN, XLA:CPU and PyTorch to this instruction set, as on an older CPU.",
    )  # fmt: skip
    flags.DEFINE_integer("batch_size", 128, "Batch size of every step.")
    flags.DEFINE_integer("windows", 5, "Timed windows per side (median taken).")
    flags.DEFINE_integer("steps", 2, "Steps per timed window.")
    flags.DEFINE_bool("quick", False, "Tiny sizes: proves the script runs.")
    flags.DEFINE_bool("bf16", False, "Also JAX bf16 against torch bf16 autocast.")
    flags.DEFINE_bool("no_subprocess", False, "Skip the compile/warm-start/memory subprocesses.")
    flags.DEFINE_bool("no_pipeline", False, "Skip the input-pipeline check.")
    flags.DEFINE_bool(
        "layers", False, "Also time resnet18-cifar's 3x3 convs one by one: XLA, oneDNN, torch."
    )
    flags.DEFINE_integer("gemm_size", 2048, "Size of the float32 GEMM that gives the peak.")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
    flags.DEFINE_enum(
        "child", "", ["", "jax", "torch"],
        "Internal: measure one side's start-up and memory in this fresh process.",
    )  # fmt: skip
    flags.DEFINE_string("cache_dir", "", "Internal: the child's compilation cache.")


def settings() -> SimpleNamespace:
    """The flags' values, with --quick's tiny sizes in place of the sizes (they win) and `model`,
    the first of --models."""
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.quick:
        args.batch_size, args.windows, args.steps, args.gemm_size = 8, 2, 1, 256
        if args.models == list(harness.MODELS):
            args.models = ["resnet20"]
    args.model = args.models[0]
    return args


def main(argv: list[str]) -> None:
    """Measures, prints the report and writes the JSON (or, as a child, one JSON line)."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}. Run with --help to see the flags.")
    args = settings()
    if args.max_isa:  # before JAX starts a backend and torch is imported
        os.environ.update(cpu.isa_capped_environment(args.max_isa))
    cpu.setup_if_cpu()  # before JAX starts a backend, as the command lines do
    if args.child:
        child_main(args)
        return
    names = args.models
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join([".venv/bin/python", "-m", "experiments.benchmark", *sys.argv[1:]]),
        "gemm_size": args.gemm_size,
        "gemm_gflop_s": gemm_peak(args.gemm_size),
        "rows": [],
    }
    peak = result["gemm_gflop_s"]["jax"]
    for name in names:
        for kernel_set in args.kernels:
            print(f"... {name} ({kernel_set})", file=sys.stderr, flush=True)
            result["rows"].append(bench_model(name, kernel_set, args, peak))
    if not args.no_pipeline:
        name = names[0] if args.quick else "resnet18-cifar"
        print(f"... input pipeline ({name})", file=sys.stderr, flush=True)
        check = pipeline_check(name, args.batch_size, args.windows, args.steps)
        result["pipeline"] = {"model": name, "batch_size": args.batch_size, **check}
    if args.layers:
        print("... single conv layers", file=sys.stderr, flush=True)
        result["conv_layers"] = conv_layers(args.batch_size, args.windows, args.quick)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
