"""Input-pipeline throughput: JPEG decode + RandomResizedCrop 224 + flip, grain against torchvision.

    .venv/bin/python experiments/pipeline_benchmark.py --json pipeline.json   # docs/PERFORMANCE.md
    .venv/bin/python experiments/pipeline_benchmark.py --quick                # tiny sizes (~1 min)
    make bench-pipeline ARGS="--images 4096 --workers 1,2,4"

Both sides read the same folder of JPEGs written at the start of the run (ImageNet-like sizes,
~400x350 on average, quality 90; or `--folder` with train/<class>/*.jpg) and make uint8 batches of
random 224x224 crops, flipped at random:
- ours: grain, a `MapDataset` over the file list, shuffled and repeated, `random_map` with
  resnet_jax.transforms (decode_image, random_resized_crop, horizontal_flip), batched in
  `--workers` worker processes (`mp_prefetch`), each reading with `--read_threads` threads;
- torchvision: `ImageFolder` + `DataLoader(num_workers=k)` with RandomResizedCrop(224),
  RandomHorizontalFlip() and PILToTensor() (uint8, as ours: both normalize on the device).
For each worker count the two sides run in turn (grain, torch, then torch, grain, ...: a drifting
machine load hits both alike), each in its own processes, started, warmed up (its first batches,
worker start-up included, are not timed), then timed over `--windows` windows of
`--window_batches` batches per worker. A side's figures are medians over its windows: images/s,
and CPU milliseconds per image (user + system of the main process and its workers), which other
load on a shared machine leaves unchanged where it slows images/s. The ratios are grain's speed
over torchvision's (goal: >= 1.0x).

Then one ResNet-50 train step at 224 (`--step_batch_size`, compiled as benchmark.py does) is
timed on a device-resident batch: if its images/s exceed the pipeline's, the pipeline bounds
training on this machine (where the step and the workers also share the same cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_jax import transforms  # noqa: E402

# Grain's worker processes start by spawn and import this module: JAX, torch and the trainer
# are imported inside the functions that need them, so the workers stay light.

CROP_SIZE = 224
# ImageNet's train images average about 400x350; sizes are drawn around that.
WIDTHS, HEIGHTS = (300, 500), (250, 450)


# ----------------------------------------------------------------------------------------------
# The images


def make_jpeg_folder(root: Path, count: int, num_classes: int, seed: int = 0) -> None:
    """Writes `count` JPEGs (quality 90) under root/train/<class>/: smooth random colour fields
    with grain-like noise, so that they compress like photos rather than like flat colour."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(*WIDTHS)), int(rng.integers(*HEIGHTS))
        coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.normal(0.0, 8.0, smooth.shape)
        pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        class_dir = root / "train" / f"class_{index % num_classes:03d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(class_dir / f"{index:06d}.jpg", quality=90)


def list_folder(root: Path) -> tuple[list[str], list[int]]:
    """The train/<class>/*.jpg files in ImageFolder's order, and their class indices."""
    class_dirs = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.glob("*.jpg")):
            paths.append(str(path))
            labels.append(label)
    return paths, labels


# ----------------------------------------------------------------------------------------------
# The two pipelines: each an iterator of {"image": uint8 batch, "label": int batch}


def train_example(record: tuple[str, int], rng: np.random.Generator) -> dict[str, Any]:
    """One training example from (path, label): decode, random resized crop, random flip."""
    path, label = record
    image = transforms.decode_image(Path(path))
    crop = transforms.random_resized_crop(image, rng, CROP_SIZE)
    return {"image": transforms.horizontal_flip(crop, rng), "label": label}


def grain_batches(
    root: Path, batch_size: int, workers: int, read_threads: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Our side: grain over the folder's file list, transforms in `workers` processes."""
    paths, labels = list_folder(root)
    examples = (
        grain.MapDataset.source(list(zip(paths, labels, strict=True)))
        .shuffle(seed=seed)
        .repeat()
        .random_map(train_example, seed=seed)
    )
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=batch_size)
    # Batched as an IterDataset, last before mp_prefetch: workers stack into shared memory.
    batches = examples.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True)
    return iter(batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def torch_batches(root: Path, batch_size: int, workers: int, seed: int = 0) -> Iterator[Any]:
    """torchvision's side: ImageFolder + DataLoader, the same transforms, uint8 CHW batches."""
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(
        str(root / "train"),
        transform=T.Compose(
            [T.RandomResizedCrop(CROP_SIZE), T.RandomHorizontalFlip(), T.PILToTensor()]
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    # Many epochs in one sampler: no pause at an epoch's end, like grain's repeat().
    sampler = RandomSampler(folder, num_samples=len(folder) * 1000, generator=generator)
    loader = DataLoader(
        folder, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True
    )
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Timing


def process_tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by a process and all its live descendants."""
    pid = os.getpid() if pid is None else pid
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        children = [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except (OSError, IndexError):  # the process ended meanwhile
        return 0.0
    return total + sum(process_tree_cpu_s(child) for child in children)


def measure(
    make_batches: Callable[[], Iterator[Any]],
    batch_size: int,
    warmup: int,
    windows: int,
    window_batches: int,
) -> dict[str, Any]:
    """Start-up (to the first batch), then each timed window's images/s and CPU ms per image
    (this process and its workers: what other load on the machine does not change)."""
    start = time.perf_counter()
    batches = make_batches()
    next(batches)
    startup_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(batches)
    rates, cpu_ms = [], []
    for _ in range(windows):
        start, start_cpu = time.perf_counter(), process_tree_cpu_s()
        for _ in range(window_batches):
            next(batches)
        images = window_batches * batch_size
        rates.append(images / (time.perf_counter() - start))
        cpu_ms.append(1000 * (process_tree_cpu_s() - start_cpu) / images)
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    del batches
    gc.collect()  # ends torch's worker processes now, not during the other side's windows
    return {"startup_s": startup_s, "windows_img_s": rates, "windows_cpu_ms": cpu_ms}


def compare(args: argparse.Namespace, root: Path, workers: int) -> dict[str, Any]:
    """Grain against torchvision at one worker count, alternating the order round by round."""
    sides = {
        "grain": lambda: grain_batches(root, args.batch_size, workers, args.read_threads),
        "torch": lambda: torch_batches(root, args.batch_size, workers),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            print(f"... {workers} worker(s), {name}", file=sys.stderr, flush=True)
            # Whole rounds over the workers (each returns its batches in turn) per window.
            batches_per_window = args.window_batches * workers
            runs[name].append(
                measure(sides[name], args.batch_size, 2 * workers, args.windows, batches_per_window)
            )
    row: dict[str, Any] = {"workers": workers}
    for name, measured in runs.items():
        windows = [rate for run in measured for rate in run["windows_img_s"]]
        row[f"{name}_img_s"] = statistics.median(windows)
        row[f"{name}_windows_img_s"] = windows
        cpu_ms = [ms for run in measured for ms in run["windows_cpu_ms"]]
        row[f"{name}_cpu_ms_per_img"] = statistics.median(cpu_ms)
        row[f"{name}_windows_cpu_ms"] = cpu_ms
        row[f"{name}_startup_s"] = statistics.median(run["startup_s"] for run in measured)
    row["ratio"] = row["grain_img_s"] / row["torch_img_s"]
    row["cpu_ratio"] = row["torch_cpu_ms_per_img"] / row["grain_cpu_ms_per_img"]
    row["load_avg_1min"] = os.getloadavg()[0]
    return row


def train_step_img_s(model: str, batch_size: int, image_size: int, windows: int) -> dict:
    """Images/s of the compiled train step on a device-resident batch, as benchmark.py times it."""
    from resnet_jax import cpu

    cpu.setup_if_cpu()  # before JAX starts a backend, as the command lines do
    import jax

    from experiments import benchmark
    from resnet_jax import parallel

    par = parallel.Parallel("jit")
    state = par.place_state(benchmark.make_state(model))
    rng = np.random.default_rng(0)
    batch = par.shard_batch(
        {
            "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
            "label": rng.integers(0, benchmark.NUM_CLASSES, batch_size, dtype=np.int32),
        }
    )
    start = time.perf_counter()
    step = par.compile_train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    states = [state]

    def one_step() -> Any:
        states[0], metrics = step(states[0], batch)
        return metrics

    seconds = benchmark.alternate({"step": benchmark.timed(one_step)}, windows, 1)
    return {
        "model": model,
        "backend": jax.default_backend(),
        "batch_size": batch_size,
        "image_size": image_size,
        "compile_s": compile_s,
        "step_s": seconds["step"],
        "img_s": batch_size / seconds["step"],
    }


# ----------------------------------------------------------------------------------------------
# The report


def print_report(result: dict[str, Any]) -> None:
    print(f"\nCommand: {result['command']}")
    f = result["folder"]
    print(
        f"{f['images']} JPEGs, mean {f['mean_width']:.0f}x{f['mean_height']:.0f}, "
        f"{f['mean_kib']:.0f} KiB each; batch {result['batch_size']}, crop {CROP_SIZE}, "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| workers | grain img/s | torchvision img/s | **ratio** | CPU ms/img grain / torch | "
        "CPU ratio | start-up s grain / torch | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['workers']} | {r['grain_img_s']:.0f} | {r['torch_img_s']:.0f} | "
            f"**{r['ratio']:.2f}x** | {r['grain_cpu_ms_per_img']:.2f} / "
            f"{r['torch_cpu_ms_per_img']:.2f} | {r['cpu_ratio']:.2f}x | "
            f"{r['grain_startup_s']:.1f} / {r['torch_startup_s']:.1f} | {r['load_avg_1min']:.1f} |"
        )
    s = result.get("step")
    if s:
        best = max(result["rows"], key=lambda r: r["grain_img_s"])
        bound = "the input pipeline" if best["grain_img_s"] < s["img_s"] else "the train step"
        print(
            f"\n{s['model']} train step at {s['image_size']}, batch {s['batch_size']} "
            f"({s['backend']}): {1000 * s['step_s']:.0f} ms/step = {s['img_s']:.1f} img/s; the "
            f"pipeline with {best['workers']} worker(s): {best['grain_img_s']:.0f} img/s -> "
            f"{bound} bounds training here."
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--folder", default="", help="use this folder's train/<class>/*.jpg instead")
    p.add_argument("--images", type=int, default=1024, help="JPEGs to write (without --folder)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument(
        "--read_threads",
        type=int,
        default=0,
        help="grain's read threads per worker (0: the worker's own thread, as torch's workers)",
    )
    p.add_argument("--rounds", type=int, default=2, help="runs of each side per worker count")
    p.add_argument("--windows", type=int, default=3, help="timed windows per run")
    p.add_argument("--window_batches", type=int, default=2, help="batches per worker per window")
    p.add_argument("--step_model", default="resnet50", help="a model of benchmark.py's MODELS")
    p.add_argument("--step_batch_size", type=int, default=32)
    p.add_argument("--step_image_size", type=int, default=224)
    p.add_argument("--no_step", action="store_true", help="skip the train-step timing")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size = 64, 8
        args.rounds, args.windows, args.window_batches = 1, 2, 1
        args.step_model, args.step_batch_size, args.step_image_size = "resnet20", 2, 32
    return args


def folder_stats(root: Path) -> dict[str, float]:
    paths, _ = list_folder(root)
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    return {
        "images": len(paths),
        "mean_width": float(np.mean([w for w, _ in sizes])),
        "mean_height": float(np.mean([h for _, h in sizes])),
        "mean_kib": float(np.mean([os.path.getsize(path) for path in paths])) / 1024,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags; this script takes argparse's
    result: dict[str, Any] = {
        "command": " ".join(
            [".venv/bin/python", "experiments/pipeline_benchmark.py", *sys.argv[1:]]
        ),
        "batch_size": args.batch_size,
        "read_threads": args.read_threads,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="pipeline_benchmark_") as tmp:
        root = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            print(f"... writing {args.images} JPEGs", file=sys.stderr, flush=True)
            make_jpeg_folder(root, args.images, args.classes)
        result["folder"] = folder_stats(root)
        for workers in [int(w) for w in args.workers.split(",")]:
            result["rows"].append(compare(args, root, workers))
    if not args.no_step:
        print(f"... {args.step_model} train step", file=sys.stderr, flush=True)
        result["step"] = train_step_img_s(
            args.step_model, args.step_batch_size, args.step_image_size, args.windows
        )
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
