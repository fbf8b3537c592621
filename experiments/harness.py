"""What the benchmarks share: the two sides' trainers, the alternating timer, the machine.

benchmark.py (the CPU), gpu_benchmark.py, pipeline_benchmark.py and augment_cost.py time the
train step through this module, so that each side runs the same way in all of them:

- `JaxTrainer`: what users run, a `train_state.TrainStep` compiled ahead of time by
  `parallel.Parallel("jit").compile_train_step(step)` (state donated), on one device-resident
  batch.
  `flops()` is XLA's cost analysis of that step with the model on plain Flax (kernels="xla"):
  the same arithmetic in ops XLA can count (it cannot see into the CPU kernel set's oneDNN calls).
- `TorchTrainer`: torchvision's twin of the model (`torch_model`) in PyTorch, channels-last, SGD
  with the same hyperparameters, on the same images; eager, or with the model under
  `torch.compile`.
- `alternate` and `timed`: each side's median seconds per step over windows that alternate
  between the sides, in an order that flips every round.
- `machine`: the host, the accelerator and the frameworks' versions, for the results' JSON.

It imports neither tensorflow, tfds, grain nor ml_collections (the GPU machine's image has none of
them), and torch only where a torch side is built.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models, optim, parallel, train_state
from resnet_jax.cpu import kernels as cpu_kernels

# name -> (resnet_jax model name, stem); the torch twin is built by `torch_model`.
MODELS: dict[str, tuple[str, str]] = {
    "resnet18-cifar": ("resnet18", "cifar"),
    "resnet50": ("resnet50", "imagenet"),
    "resnet20": ("resnet20", "cifar"),
}
NUM_CLASSES = 10
IMAGE_SIZE = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

Runner = Callable[[int], float]  # runs n steps, returns the seconds per step


# ----------------------------------------------------------------------------------------------
# Timing


def alternate(runners: dict[str, Runner], windows: int, steps: int) -> dict[str, Any]:
    """Median seconds per step of each runner over `windows` windows of `steps` steps, alternating
    the runners within a round and reversing the order every other round; `<name>_windows` holds
    each runner's windows."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for window in range(windows):
        for name in names if window % 2 == 0 else reversed(names):
            times[name].append(runners[name](steps))
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_windows": t for name, t in times.items()
    }


def timed(fn: Callable[[], Any]) -> Runner:
    """`run(n)`: the seconds per call of `fn` over n calls, its outputs waited for (warmed up)."""

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)  # torch's outputs are ready already
        return (time.perf_counter() - start) / n

    run(1)
    return run


# ----------------------------------------------------------------------------------------------
# The JAX side


def host_batch(
    batch_size: int,
    image_size: int = IMAGE_SIZE,
    num_classes: int = NUM_CLASSES,
    *,
    uint8: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random NHWC images (normalized float32, or uint8 pixels for an on-device preprocess) and
    labels; never zeros, which can time faster."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, image_size, image_size, 3)
    if uint8:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        image = rng.standard_normal(shape, dtype=np.float32)
    return {"image": image, "label": rng.integers(0, num_classes, batch_size, dtype=np.int32)}


def make_state(
    name: str,
    *,
    num_classes: int = NUM_CLASSES,
    image_size: int = IMAGE_SIZE,
    dtype: Any = jnp.float32,
    kernels: str = "auto",
) -> train_state.TrainState:
    """The train state of `MODELS[name]`: SGD with the benchmark's hyperparameters."""
    arch, stem = MODELS[name]
    model = models.get_model(arch, num_classes, stem=stem, dtype=dtype, kernels=kernels)
    tx = optim.make_optimizer("sgd", LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return train_state.create(model, tx, jax.random.key(0), (1, image_size, image_size, 3))


def flops_of(compiled: Any) -> float:
    """FLOPs of a lowered or compiled computation by XLA's cost analysis (0 if it counts none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per device program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


class JaxTrainer:
    """resnet_jax's compiled train step (`train_state.TrainStep` with the given on-device
    preprocess, default a cast to float, and mix) on one placed state and one device-resident
    batch.

    `trainer(n)` runs n steps and returns the seconds per step (one host sync, at the end);
    `trainer(n, batches)` places each step's batch from the host iterator `batches` instead.
    """

    def __init__(
        self,
        name: str,
        batch: dict[str, np.ndarray],
        *,
        num_classes: int = NUM_CLASSES,
        dtype: Any = jnp.float32,
        kernels: str = "auto",
        preprocess: train_state.Preprocess | None = None,
        mix: train_state.Mix | None = None,
        warmup_steps: int = 1,
    ):
        self.par = parallel.Parallel("jit")
        self.kernels = cpu_kernels.resolve_kernels(kernels)
        self._state_options = dict(
            num_classes=num_classes, image_size=batch["image"].shape[1], dtype=dtype
        )
        self.name = name
        self.state = self.par.place_state(make_state(name, kernels=kernels, **self._state_options))
        self.batch = self.par.shard_batch(batch)
        preprocess = preprocess or train_state.cast_to_float
        self.train_step = train_state.TrainStep(preprocess=preprocess, mix=mix)
        self.eval_step = train_state.EvalStep(self.state.apply_fn, preprocess)
        start = time.perf_counter()
        self._lowered = self.par.compile_train_step(self.train_step).lower(self.state, self.batch)
        self.step = self._lowered.compile()
        self.compile_s = time.perf_counter() - start
        self(warmup_steps)

    def flops(self) -> float:
        """FLOPs of one step: XLA's cost analysis of the optimized step with the model on plain
        Flax (this step if it already is; else the same step compiled so, not run), or of its
        unoptimized HLO where the backend's analysis counts none."""
        if self.kernels == "xla":
            lowered, compiled = self._lowered, self.step
        else:
            state = self.par.place_state(
                make_state(self.name, kernels="xla", **self._state_options)
            )
            lowered = self.par.compile_train_step(self.train_step).lower(state, self.batch)
            compiled = lowered.compile()
        return flops_of(compiled) or flops_of(lowered)

    def __call__(self, steps: int, batches: Iterator[dict[str, np.ndarray]] | None = None) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batch if batches is None else self.par.shard_batch(next(batches))
            self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready(metrics)  # the one host sync, at the end of the window
        return (time.perf_counter() - start) / steps

    def evaluator(self) -> Runner:
        """`run(n)`: the seconds per eval step over n steps on the trainer's state and batch."""
        variables, batch = self.state.variables, self.batch
        step = self.par.compile_eval_step(self.eval_step).lower(variables, batch).compile()

        def run(steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                metrics = step(variables, batch)
            jax.block_until_ready(metrics)
            return (time.perf_counter() - start) / steps

        run(1)
        return run


# ----------------------------------------------------------------------------------------------
# The PyTorch side


def torch_model(name: str, num_classes: int = NUM_CLASSES) -> Any:
    """torchvision's twin of `MODELS[name]` (resnet20: He et al.'s CIFAR net, `cifar_resnet`)."""
    import torch
    import torchvision

    if name == "resnet20":
        return cifar_resnet(3, num_classes)
    arch, stem = MODELS[name]
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if stem == "cifar":  # the CIFAR stem: 3x3/1 conv, no max-pool
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def cifar_resnet(n: int, num_classes: int = NUM_CLASSES) -> Any:
    """ResNet-(6n+2) for CIFAR in PyTorch, widths 16/32/64, shortcut A: the twin of resnet_jax's
    resnet20 (n=3), which torchvision lacks."""
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
        def __init__(self):
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

    return CifarResNet()


class TorchTrainer:
    """torchvision's twin in PyTorch on the same batch, channels-last, SGD with the benchmark's
    hyperparameters; bf16 autocast with `bf16`, the model under `torch.compile(backend=...)` with
    `compile_backend`. On the CPU it uses every core.

    `trainer(n)` runs n steps and returns the seconds per step; `first_step_s` is the first step's
    (torch.compile compiles there, eager picks its cuDNN kernels), after which `warmup_steps` more
    run untimed.
    """

    def __init__(
        self,
        name: str,
        batch: dict[str, np.ndarray],
        *,
        num_classes: int = NUM_CLASSES,
        bf16: bool = False,
        device: str = "cpu",
        compile_backend: str | None = None,
        warmup_steps: int = 0,
    ):
        import torch

        self.torch, self.device, self.bf16 = torch, torch.device(device), bf16
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        model = torch_model(name, num_classes).to(self.device, memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self.model = torch.compile(model, backend=compile_backend) if compile_backend else model
        # NHWC memory seen as NCHW: channels-last, the same images as the JAX side.
        self.x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).to(self.device)
        self.y = torch.from_numpy(batch["label"]).long().to(self.device)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.first_step_s = self(1)
        if warmup_steps:
            self(warmup_steps)

    def __call__(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
        self._wait(loss)
        return (time.perf_counter() - start) / steps

    def evaluator(self) -> Runner:
        """`run(n)`: the seconds per inference step (eval mode, no autograd) over n steps."""
        torch, model = self.torch, self.model

        def run(steps: int) -> float:
            model.eval()
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(steps):
                    logits = model(self.x)
                self._wait(logits.sum())
            model.train()
            return (time.perf_counter() - start) / steps

        run(1)
        return run

    def _wait(self, result: Any) -> None:
        """Ends a timed window once the device has computed `result` (a scalar tensor)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()  # kernels run asynchronously
        else:
            result.item()


# ----------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    """The CPU's model name (lscpu's), or what `platform` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on: host, CPU, accelerator and the frameworks' versions."""
    import flax
    import torch
    import torchvision

    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
