"""Training and eval throughput of resnet_jax against torchvision + PyTorch on this machine.

    .venv/bin/python experiments/benchmark.py                    # the table in docs/PERFORMANCE.md
    .venv/bin/python experiments/benchmark.py --quick            # tiny sizes: a smoke test (~1 min)
    make bench ARGS="--models resnet18-cifar --windows 7"

Every comparison is measured in one process and alternates: JAX window, torch window, torch,
JAX, ... (the order flips each round so a drifting machine load hits both sides alike), and each
side's figure is the median over windows after warm-up. On a shared machine absolute times drift by
2x from minute to minute; the ratios measured side by side are what to read. The 1-minute load
average is printed with each model so a noisy run shows as one.

What runs on the JAX side is what users run: `train_state.train_step` compiled by
`parallel.Parallel("jit").compile_train_step()` (state donated), on batches placed with
`shard_batch`. FLOPs come from the compiled step's `cost_analysis()` (with XLA's convs in place of
oneDNN's, which it cannot see into); GFLOP/s are set against a float32 GEMM timed in the same run.
On one CPU device the model runs on the CPU kernel set (`get_model`'s kernels="auto"), and the
process gets the CPU settings of `resnet_jax.cpu.setup()` at start-up, as the command lines do.
Compile time, warm start from the persistent compilation cache and peak memory (ru_maxrss) are
measured in fresh subprocesses of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from resnet_jax import cpu, data, models, optim, parallel, train_state  # noqa: E402
from resnet_jax.cpu import kernels, onednn  # noqa: E402
from resnet_jax.cpu.kernels import resolve_kernels  # noqa: E402

try:  # on-device crop + flip; the input-pipeline check falls back to normalize-only without it
    from resnet_jax import augment
except ImportError:  # pragma: no cover
    augment = None

# name -> (resnet_jax model name, stem); the torch twin is built by `torch_model`.
MODELS: dict[str, tuple[str, str]] = {
    "resnet18-cifar": ("resnet18", "cifar"),
    "resnet50": ("resnet50", "imagenet"),
    "resnet20": ("resnet20", "cifar"),
}
NUM_CLASSES = 10
IMAGE_SIZE = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


# ----------------------------------------------------------------------------------------------
# Timing


def alternate(runners: dict[str, Callable[[int], float]], windows: int, steps: int) -> dict:
    """Median seconds per step of each runner over `windows` windows of `steps` steps, alternating
    the runners within a round and reversing the order every other round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for window in range(windows):
        for name in names if window % 2 == 0 else reversed(names):
            times[name].append(runners[name](steps))
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_windows": t for name, t in times.items()
    }


def gemm_peak(size: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a (size x size) @ (size x size) float32 matmul, JAX and torch, median of runs."""
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    matmul = jax.jit(jnp.matmul)
    ta = torch.from_numpy(np.array(a))
    jax_run, torch_run = timed(lambda: matmul(a, a)), timed(lambda: ta @ ta)

    result = alternate({"jax": jax_run, "torch": torch_run}, repeats, 3)
    flops = 2.0 * size**3
    return {"jax": flops / result["jax"] / 1e9, "torch": flops / result["torch"] / 1e9}


# ----------------------------------------------------------------------------------------------
# The JAX side


def make_state(
    name: str, dtype: Any = jnp.float32, preprocess=None, kernels: str = "auto"
) -> train_state.TrainState:
    arch, stem = MODELS[name]
    model = models.get_model(arch, NUM_CLASSES, stem=stem, dtype=dtype, kernels=kernels)
    tx = optim.make_optimizer("sgd", LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    kwargs = {"preprocess": preprocess} if preprocess is not None else {}
    return train_state.create(
        model, tx, jax.random.key(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3), **kwargs
    )


def host_batch(batch_size: int, uint8: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)
    if uint8:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        image = rng.standard_normal(shape, dtype=np.float32)
    return {"image": image, "label": rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32)}


def flops_of(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per device program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


class JaxTrainer:
    """The compiled train step on one state and one device-resident batch."""

    def __init__(
        self, name: str, batch_size: int, dtype: Any = jnp.float32, preprocess=None,
        kernels: str = "auto",
    ):  # fmt: skip
        self.par = parallel.Parallel("jit")
        self.state = self.par.place_state(make_state(name, dtype, preprocess, kernels))
        uint8 = preprocess is not None
        self.batch = self.par.shard_batch(host_batch(batch_size, uint8=uint8))
        start = time.perf_counter()
        self.step = self.par.compile_train_step().lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.flops = self.flops_with_xla_convs()
        self(1)  # warm-up

    def flops_with_xla_convs(self) -> float:
        """The step's FLOPs: XLA's cost analysis cannot see into the oneDNN custom calls, so it
        counts the same step compiled with XLA's own convs (the same arithmetic)."""
        usable = onednn.usable
        onednn.usable = lambda lhs, rhs: False
        jax.clear_caches()  # or jit would reuse the trace with oneDNN's convs
        try:
            return flops_of(self.par.compile_train_step().lower(self.state, self.batch).compile())
        finally:
            onednn.usable = usable
            jax.clear_caches()

    def __call__(self, steps: int, batches=None) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batch if batches is None else self.par.shard_batch(next(batches))
            self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready(metrics)  # the one host sync, at the end of the window
        return (time.perf_counter() - start) / steps


class JaxEvaluator:
    def __init__(self, trainer: JaxTrainer):
        self.state, self.batch = trainer.state, trainer.batch
        step = trainer.par.compile_eval_step()
        self.step = step.lower(self.state, self.batch).compile()
        self(1)

    def __call__(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------------------------
# The PyTorch side


def torch_model(name: str, num_classes: int = NUM_CLASSES):
    """torchvision's twin of `MODELS[name]` (resnet20: the twin module below)."""
    import torch
    import torchvision

    if name == "resnet20":
        return TorchCifarResNet(3, num_classes)
    arch, stem = MODELS[name]
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if stem == "cifar":  # the CIFAR stem: 3x3/1 conv, no max-pool
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def _torch_cifar_resnet():
    import torch
    from torch import nn

    class Block(nn.Module):
        """He et al.'s basic block with the parameter-free shortcut A."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.extra:
                short = nn.functional.pad(short, (0, 0, 0, 0, 0, self.extra))
            return torch.relu(y + short)

    class CifarResNet(nn.Module):
        """ResNet-(6n+2) for CIFAR, widths 16/32/64: the twin of resnet_jax's resnet20."""

        def __init__(self, n: int, num_classes: int = NUM_CLASSES):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for stage, width in enumerate((16, 32, 64)):
                for index in range(n):
                    stride = 2 if stage > 0 and index == 0 else 1
                    layers.append(Block(cin, width, stride))
                    cin = width
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.layers(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(x.mean((2, 3)))

    return CifarResNet


def TorchCifarResNet(n: int, num_classes: int = NUM_CLASSES):
    return _torch_cifar_resnet()(n, num_classes)


class TorchTrainer:
    def __init__(self, name: str, batch_size: int, bf16: bool = False):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.bf16 = torch, bf16
        self.model = torch_model(name).to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        batch = host_batch(batch_size)
        image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)  # NHWC memory = channels_last
        self.x, self.y = image, torch.from_numpy(batch["label"]).long()
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self(1)

    def __call__(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
        loss.item()
        return (time.perf_counter() - start) / steps

    def evaluator(self) -> Callable[[int], float]:
        torch, model = self.torch, self.model

        def run(steps: int) -> float:
            model.eval()
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(steps):
                    logits = model(self.x)
                logits.sum().item()
            model.train()
            return (time.perf_counter() - start) / steps

        run(1)
        return run


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


def child_main(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints one JSON line for the parent."""
    start = time.perf_counter()
    if args.child == "torch":
        import torchvision  # noqa: F401  (imported before the baseline, as jax already is)
    baseline = rss_mib()  # count what the run adds to the imported framework
    if args.child == "torch":
        trainer = TorchTrainer(args.model, args.batch_size)
        trainer(2)
        out: dict[str, Any] = {}
    else:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        trainer = JaxTrainer(args.model, args.batch_size)
        first_step = time.perf_counter() - start
        trainer(2)
        out = {"compile_s": trainer.compile_s, "first_step_s": first_step}
    out["peak_rss_mib"] = rss_mib("VmHWM")
    out["added_rss_mib"] = out["peak_rss_mib"] - baseline
    print("RESULT " + json.dumps(out), flush=True)


def run_child(kind: str, model: str, batch_size: int, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--models", model,
           "--batch_size", str(batch_size), "--cache_dir", cache_dir]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
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
        rng.integers(0, 256, (num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        rng.integers(0, NUM_CLASSES, num_examples, dtype=np.int32),
    )
    if augment is not None:
        preprocess = augment.make_preprocess(
            mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, crop_padding=4, flip=True
        )
        what = "crop(pad 4)+flip+normalize on device"
    else:
        preprocess = _normalize_only
        what = "normalize on device (augment.py not present)"

    def batches():
        epoch = 0
        while True:
            yield from data.train_batches(split, batch_size, seed=0, epoch=epoch)
            epoch += 1

    plain = JaxTrainer(name, batch_size)
    fed = JaxTrainer(name, batch_size, preprocess=preprocess)
    feed = batches()
    times = alternate(
        {"device_batch": plain, "pipeline": lambda n: fed(n, feed), "augment_only": fed},
        windows,
        steps,
    )
    return {
        "what": what,
        "device_batch_s": times["device_batch"],
        "augment_only_s": times["augment_only"],
        "pipeline_s": times["pipeline"],
        "overhead": times["pipeline"] / times["device_batch"] - 1.0,
        "augment_overhead": times["augment_only"] / times["device_batch"] - 1.0,
    }


def _normalize_only(images, rng=None):
    del rng
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25


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
            times = alternate({side: passes[kind] for side, passes in sides.items()}, windows, 2)
            rows.append(
                {"layer": layer, "pass": kind}
                | {f"{side}_gflop_s": flops / times[side] / 1e9 for side in sides}
            )
    return rows


def timed(fn: Callable[[], Any]) -> Callable[[int], float]:
    """`run(n)`: the seconds per call of `fn` over n calls, its outputs waited for (warmed up)."""

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)  # torch's outputs are ready already
        return (time.perf_counter() - start) / n

    run(1)
    return run


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
        "forward": timed(lambda: forward(x, w)),
        "input_grad": timed(lambda: input_grad(x, w)),
        "kernel_grad": timed(lambda: kernel_grad(x, w)),
    }


def _torch_conv_passes(x: np.ndarray, w: np.ndarray, stride: int) -> dict[str, Callable]:
    import torch

    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC memory: channels-last
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    dy = torch.ones_like(torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1))

    def backward(mask: list[bool]):
        args = (dy, tx, tw, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)
        return timed(lambda: torch.ops.aten.convolution_backward(*args))

    return {
        "forward": timed(lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)),
        "input_grad": backward([True, False, False]),
        "kernel_grad": backward([False, True, False]),
    }


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import torch

    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "kernels": resolve_kernels("auto"),
        "convs": "oneDNN" if onednn.available() else "XLA",
    }


def bench_model(name: str, kernels: str, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    batch = args.batch_size
    jax_train = JaxTrainer(name, batch, kernels=kernels)
    torch_train = TorchTrainer(name, batch)
    train = alternate({"jax": jax_train, "torch": torch_train}, args.windows, args.steps)
    jax_eval, torch_eval = JaxEvaluator(jax_train), torch_train.evaluator()
    evals = alternate({"jax": jax_eval, "torch": torch_eval}, args.windows, args.steps)
    row: dict[str, Any] = {
        "model": name,
        "kernels": resolve_kernels(kernels),
        "batch_size": batch,
        "jax_train_img_s": batch / train["jax"],
        "torch_train_img_s": batch / train["torch"],
        "train_ratio": train["torch"] / train["jax"],
        # The fastest window of each side: closest to what a quiet machine would show.
        "train_ratio_best": min(train["torch_windows"]) / min(train["jax_windows"]),
        "jax_eval_img_s": batch / evals["jax"],
        "torch_eval_img_s": batch / evals["torch"],
        "eval_ratio": evals["torch"] / evals["jax"],
        "gflop_per_step": jax_train.flops / 1e9,
        "jax_gflop_s": jax_train.flops / train["jax"] / 1e9,
        "fraction_of_gemm_peak": jax_train.flops / train["jax"] / 1e9 / peak,
        "windows": {"jax": train["jax_windows"], "torch": train["torch_windows"]},
        "load_avg_1min": os.getloadavg()[0],
    }
    if args.bf16:
        jax_bf16 = JaxTrainer(name, batch, dtype=jnp.bfloat16, kernels=kernels)
        torch_bf16 = TorchTrainer(name, batch, bf16=True)
        half = alternate({"jax": jax_bf16, "torch": torch_bf16}, args.windows, args.steps)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS)
    )
    p.add_argument(
        "--kernels",
        default="auto",
        help="comma-separated kernel sets (model.kernels: auto, cpu, xla), one row each",
    )
    p.add_argument(
        "--max_isa",
        default="",
        choices=["", *cpu.ISA_CAPS],
        help="hold oneDNN, XLA:CPU and PyTorch to this instruction set, as on an older CPU",
    )
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--windows", type=int, default=5, help="timed windows per side (median taken)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed window")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    p.add_argument("--bf16", action="store_true", help="also JAX bf16 against torch bf16 autocast")
    p.add_argument(
        "--no_subprocess", action="store_true", help="skip compile/warm-start/memory subprocesses"
    )
    p.add_argument("--no_pipeline", action="store_true", help="skip the input-pipeline check")
    p.add_argument(
        "--layers",
        action="store_true",
        help="also time resnet18-cifar's 3x3 convs one by one: XLA, oneDNN, torch",
    )
    p.add_argument("--gemm_size", type=int, default=2048)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.models.split(",")[0]
    if args.quick:
        args.batch_size, args.windows, args.steps, args.gemm_size = 8, 2, 1, 256
        if args.models == ",".join(MODELS):
            args.models = "resnet20"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.max_isa:  # before JAX starts a backend and torch is imported
        os.environ.update(cpu.isa_capped_environment(args.max_isa))
    cpu.setup_if_cpu()  # before JAX starts a backend, as the command lines do
    if args.child:
        child_main(args)
        return {}
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown}; valid: {', '.join(MODELS)}")
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join([".venv/bin/python", "experiments/benchmark.py", *sys.argv[1:]]),
        "gemm_size": args.gemm_size,
        "gemm_gflop_s": gemm_peak(args.gemm_size),
        "rows": [],
    }
    peak = result["gemm_gflop_s"]["jax"]
    for name in names:
        for kernel_set in args.kernels.split(","):
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
    return result


if __name__ == "__main__":
    main()
