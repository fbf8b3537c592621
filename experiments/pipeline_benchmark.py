"""Stream mode's input pipeline against torchvision's, and memory and start-up against dataset size.

    .venv/bin/python -m experiments.pipeline_benchmark --json pipeline.json   # docs/PERFORMANCE.md
    .venv/bin/python -m experiments.pipeline_benchmark --startup              # memory and start-up
    .venv/bin/python -m experiments.pipeline_benchmark --quick [--startup]    # tiny sizes
    make bench-pipeline ARGS="--images 4096 --workers 1,2,4"

Throughput (the default section). Both sides read the same folder of JPEGs written at the start of
the run (ImageNet-like sizes, ~400x350 on average, quality 90; or `--folder` with
train/<class>/*.jpg) and make uint8 batches of random 224x224 crops:
- ours: what training runs, `stream.open_stream` on the folder (dataset.name = folder:...),
  pipeline "stream", image_size 224 and stream_workers = k: grain worker processes decode and
  RandomResizedCrop each image (`resnet_jax.transforms`). Stream mode flips on the device, in the
  compiled step, so ours does no flip here;
- torchvision, as a user writes it: `ImageFolder` + `DataLoader(num_workers=k, shuffle=True)` with
  RandomResizedCrop(224), RandomHorizontalFlip() and PILToTensor() (uint8, as ours: both normalize
  on the device).
For each worker count the two sides run in turn (ours, torch, then torch, ours, ...: a drifting
machine load hits both alike), each in its own processes, over one epoch: started, warmed up (its
first batches, worker start-up included, are not timed), then timed over `--windows` windows of
`--window_batches` batches per worker. A side's figures are medians over its windows: images/s,
and CPU milliseconds per image (user + system of the main process and its workers), which other
load on a shared machine leaves unchanged where it slows images/s. The ratios are ours over
torchvision's (goal: >= 1.0x).

Then one ResNet-50 train step at 224 (`--step_batch_size`, compiled as benchmark.py does) is
timed on a device-resident batch: if its images/s exceed the pipeline's, the pipeline bounds
training on this machine (where the step and the workers also share the same cores).

Memory and start-up (`--startup`): folders of `--startup_sizes` train JPEGs at 224x224 (the
smaller ones a prefix of the largest, by hard links; test/ has 2 per class), then
`python -m resnet_jax.train` on configs/r50_imagenet.py shrunk to a tiny model (resnet18 at width
8, batch 32, `--startup_steps` steps) per (pipeline, size), each mode warmed once first so that
the persistent compilation cache (in a temporary directory) holds its step. Measured from outside,
polling the process every 20 ms: the time from its start to the first step record in
<workdir>/metrics.jsonl; the main process's peak RSS (VmHWM in /proc/<pid>/status, the last read
before it exits); the largest peak RSS of its child processes (VmHWM of each); and the peak of
the whole tree's RSS (the sum of VmRSS over the main process and
its children: grain's workers and multiprocessing's resource tracker; shared memory counts in each
process that maps it).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from resnet_jax import cpu, data, stream

REPO_ROOT = Path(__file__).resolve().parents[1]  # where the training runs start

# Grain's worker processes start by spawn and import this module: torch and the trainer's step are
# imported inside the functions that need them, so the workers stay light.

CROP_SIZE = 224
# ImageNet's train images average about 400x350; sizes are drawn around that.
WIDTHS, HEIGHTS = (300, 500), (250, 450)
TEST_PER_CLASS = 2
# --startup: the figures compared across dataset sizes, and stream mode's allowed growth.
GROWTH_KEYS = ("first_step_s", "main_peak_rss_mib", "worker_peak_rss_mib", "tree_peak_rss_mib")
FLAT = 0.15
POLL_S = 0.02


# ----------------------------------------------------------------------------------------------
# The images


def write_jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A smooth random colour field with grain-like noise (quality 90), so that it compresses like
    a photo rather than like flat colour."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noise = rng.normal(0.0, 8.0, smooth.shape)
    pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_jpeg_folder(
    root: Path, count: int, num_classes: int, size: int | None = None, seed: int = 0
) -> None:
    """Writes `count` JPEGs under root/train/<class>/ and TEST_PER_CLASS per class under
    root/test/<class>/ (which stream mode's folder layout asks for), size x size or, without
    `size`, of ImageNet-like sizes."""
    rng = np.random.default_rng(seed)
    files = [("train", index) for index in range(count)]
    files += [("test", index) for index in range(TEST_PER_CLASS * num_classes)]
    for split, index in files:
        if size:
            width = height = size
        else:
            width, height = int(rng.integers(*WIDTHS)), int(rng.integers(*HEIGHTS))
        class_name = f"class_{index % num_classes:03d}"
        write_jpeg(root / split / class_name / f"{index:06d}.jpg", width, height, rng)


# ----------------------------------------------------------------------------------------------
# The two pipelines: each an iterator over one epoch of {"image": uint8 batch, "label": int batch}


def stream_batches(
    root: Path, batch_size: int, workers: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Our side: stream mode's own batches of the folder's 224x224 crops, as training reads its
    first epoch with `workers` workers."""
    dataset = data.DatasetSpec(name=f"{data.FOLDER_PREFIX}{root}", image_size=CROP_SIZE, seed=seed)
    return stream.open_stream(dataset, batch_size, batch_size, workers).train_batches(epoch=0)


def torch_batches(root: Path, batch_size: int, workers: int, seed: int = 0) -> Iterator[Any]:
    """torchvision's side: ImageFolder + DataLoader, uint8 CHW batches, one epoch."""
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(
        str(root / "train"),
        transform=T.Compose(
            [T.RandomResizedCrop(CROP_SIZE), T.RandomHorizontalFlip(), T.PILToTensor()]
        ),
    )
    # torch forks its workers from a process where JAX runs (a warning): they never call JAX.
    loader = DataLoader(
        folder, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Processes


def children(pid: int) -> list[int]:
    """A live process's child processes (none once it has ended)."""
    try:
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """A process and all its live descendants."""
    return [pid, *(descendant for child in children(pid) for descendant in process_tree(child))]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (0 once it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def memory_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM, ...) in MiB; 0 once it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ----------------------------------------------------------------------------------------------
# Throughput


def measure(
    make_batches: Callable[[], Iterator[Any]],
    batch_size: int,
    warmup: int,
    windows: int,
    window_batches: int,
) -> dict[str, Any]:
    """Start-up (to the first batch), then each timed window's images/s and CPU ms per image
    (this process and its workers: what other load on the machine does not change)."""

    def tree_cpu_s() -> float:
        return sum(cpu_s(pid) for pid in process_tree(os.getpid()))

    start = time.perf_counter()
    batches = make_batches()
    next(batches)
    startup_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(batches)
    rates, cpu_ms = [], []
    for _ in range(windows):
        start, start_cpu = time.perf_counter(), tree_cpu_s()
        for _ in range(window_batches):
            next(batches)
        images = window_batches * batch_size
        rates.append(images / (time.perf_counter() - start))
        cpu_ms.append(1000 * (tree_cpu_s() - start_cpu) / images)
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    del batches
    gc.collect()  # ends torch's worker processes now, not during the other side's windows
    return {"startup_s": startup_s, "windows_img_s": rates, "windows_cpu_ms": cpu_ms}


def compare(args: SimpleNamespace, root: Path, workers: int) -> dict[str, Any]:
    """Stream mode against torchvision at one worker count, alternating the order round by round."""
    sides = {
        "stream": lambda: stream_batches(root, args.batch_size, workers),
        "torch": lambda: torch_batches(root, args.batch_size, workers),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            print(f"... {workers} worker(s), {name}", file=sys.stderr, flush=True)
            runs[name].append(
                measure(
                    sides[name], args.batch_size, warmup_batches(workers), args.windows,
                    args.window_batches * workers,
                )
            )  # fmt: skip
    row: dict[str, Any] = {"workers": workers}
    for name, measured in runs.items():
        windows = [rate for run in measured for rate in run["windows_img_s"]]
        row[f"{name}_img_s"] = statistics.median(windows)
        row[f"{name}_windows_img_s"] = windows
        cpu_ms = [ms for run in measured for ms in run["windows_cpu_ms"]]
        row[f"{name}_cpu_ms_per_img"] = statistics.median(cpu_ms)
        row[f"{name}_windows_cpu_ms"] = cpu_ms
        row[f"{name}_startup_s"] = statistics.median(run["startup_s"] for run in measured)
    row["ratio"] = row["stream_img_s"] / row["torch_img_s"]
    row["cpu_ratio"] = row["torch_cpu_ms_per_img"] / row["stream_cpu_ms_per_img"]
    row["load_avg_1min"] = os.getloadavg()[0]
    return row


def warmup_batches(workers: int) -> int:
    """Untimed batches at the start of a run: each worker's first two."""
    return 2 * max(workers, 1)


def train_step_img_s(model: str, batch_size: int, image_size: int, windows: int) -> dict:
    """Images/s of the compiled train step on a device-resident batch, as benchmark.py times it."""
    import jax

    from experiments import harness

    trainer = harness.JaxTrainer(model, harness.host_batch(batch_size, image_size))
    seconds = harness.alternate({"step": trainer}, windows, 1)["step"]
    return {
        "model": model,
        "backend": jax.default_backend(),
        "batch_size": batch_size,
        "image_size": image_size,
        "compile_s": trainer.compile_s,
        "step_s": seconds,
        "img_s": batch_size / seconds,
    }


# ----------------------------------------------------------------------------------------------
# Memory and start-up against dataset size


def write_startup_folders(root: Path, sizes: list[int], num_classes: int) -> dict[int, Path]:
    """A folder of 224x224 JPEGs per size, the smaller ones hard-linked prefixes of the largest."""
    largest = root / f"jpegs_{max(sizes)}"
    print(f"... writing {max(sizes)} JPEGs of {CROP_SIZE}x{CROP_SIZE}", file=sys.stderr, flush=True)
    make_jpeg_folder(largest, max(sizes), num_classes, size=CROP_SIZE)
    folders = {max(sizes): largest}
    for size in sorted(set(sizes) - {max(sizes)}):
        folders[size] = folder = root / f"jpegs_{size}"
        for path in sorted(largest.glob("*/*/*.jpg")):
            if path.parts[-3] == "test" or int(path.stem) < size:
                link = folder / path.relative_to(largest)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, link)
    return folders


def train_to_first_step(
    args: SimpleNamespace, folder: Path, pipeline: str, workdir: Path, cache_dir: Path
) -> dict[str, Any]:
    """One tiny training run of the ImageNet recipe on `folder`, watched from outside: seconds
    from its start to its first step record, the main process's peak RSS and the whole tree's."""
    command = [
        sys.executable, "-m", "resnet_jax.train", "--config=configs/r50_imagenet.py",
        f"--workdir={workdir}", f"--config.dataset.name={data.FOLDER_PREFIX}{folder}",
        f"--config.dataset.pipeline={pipeline}",
        f"--config.dataset.stream_workers={args.startup_workers}",
        "--config.model.name=resnet18", "--config.model.width=8", "--config.batch_size=32",
        "--config.eval_batch_size=32", f"--config.num_steps={args.startup_steps}",
        "--config.schedule.warmup_epochs=0", "--config.log_every_steps=1",
        f"--config.compilation_cache_dir={cache_dir}",
    ]  # fmt: skip
    metrics, log = workdir / "metrics.jsonl", workdir.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    first_step_s, main_mib, tree_mib, child_peaks = None, 0.0, 0.0, {}
    while process.poll() is None:
        if first_step_s is None and has_step_record(metrics):
            first_step_s = time.perf_counter() - start
        main_mib = max(main_mib, memory_mib(process.pid, "VmHWM"))
        tree = process_tree(process.pid)
        tree_mib = max(tree_mib, sum(memory_mib(pid, "VmRSS") for pid in tree))
        for pid in tree[1:]:
            child_peaks[pid] = max(child_peaks.get(pid, 0.0), memory_mib(pid, "VmHWM"))
        time.sleep(POLL_S)
    if process.returncode or first_step_s is None:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return {
        "pipeline": pipeline, "images": len(list(folder.glob("train/*/*.jpg"))),
        "first_step_s": first_step_s, "main_peak_rss_mib": main_mib, "tree_peak_rss_mib": tree_mib,
        "total_s": time.perf_counter() - start,
        "worker_peak_rss_mib": max(child_peaks.values(), default=0.0),
    }  # fmt: skip


def has_step_record(metrics: Path) -> bool:
    try:
        return '"record": "step"' in metrics.read_text()
    except OSError:  # not written yet
        return False


def startup_rows(args: SimpleNamespace, root: Path) -> list[dict[str, Any]]:
    """Each pipeline at each size, after one untimed run that fills the compilation cache (not
    with --quick, whose figures only prove the script runs)."""
    folders = write_startup_folders(root, args.startup_sizes, args.classes)
    cache_dir, rows = root / "jax_cache", []
    warm_up = [] if args.quick else [("warm-up", min(folders))]
    for pipeline in ("memory", "stream"):
        runs = [*warm_up, *((size, size) for size in sorted(folders))]
        for name, size in runs:
            print(f"... {pipeline}, {size} JPEGs ({name})", file=sys.stderr, flush=True)
            workdir = root / f"run_{pipeline}_{size}_{name}"
            row = train_to_first_step(args, folders[size], pipeline, workdir, cache_dir)
            if name != "warm-up":
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# The reports


def print_report(result: dict[str, Any]) -> None:
    print(f"\nCommand: {result['command']}")
    f = result["folder"]
    print(
        f"{f['images']} JPEGs, mean {f['mean_width']:.0f}x{f['mean_height']:.0f}, "
        f"{f['mean_kib']:.0f} KiB each; batch {result['batch_size']}, crop {CROP_SIZE}, "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| workers | stream img/s | torchvision img/s | **ratio** | CPU ms/img stream / torch | "
        "CPU ratio | start-up s stream / torch | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['workers']} | {r['stream_img_s']:.0f} | {r['torch_img_s']:.0f} | "
            f"**{r['ratio']:.2f}x** | {r['stream_cpu_ms_per_img']:.2f} / "
            f"{r['torch_cpu_ms_per_img']:.2f} | {r['cpu_ratio']:.2f}x | "
            f"{r['stream_startup_s']:.1f} / {r['torch_startup_s']:.1f} | "
            f"{r['load_avg_1min']:.1f} |"
        )
    s = result.get("step")
    if s:
        best = max(result["rows"], key=lambda r: r["stream_img_s"])
        bound = "the input pipeline" if best["stream_img_s"] < s["img_s"] else "the train step"
        print(
            f"\n{s['model']} train step at {s['image_size']}, batch {s['batch_size']} "
            f"({s['backend']}): {1000 * s['step_s']:.0f} ms/step = {s['img_s']:.1f} img/s; the "
            f"pipeline with {best['workers']} worker(s): {best['stream_img_s']:.0f} img/s -> "
            f"{bound} bounds training here."
        )


def print_startup_report(result: dict[str, Any]) -> None:
    print(f"\nCommand: {result['command']}")
    print(
        f"configs/r50_imagenet.py with resnet18 at width 8, batch 32, {result['steps']} steps, "
        f"stream_workers {result['stream_workers']}; JPEGs of {CROP_SIZE}x{CROP_SIZE}, "
        f"{os.cpu_count()} cores, load {result['load_avg_1min']:.1f}\n"
    )
    print(
        "| pipeline | train JPEGs | time to first step s | main peak RSS MiB | "
        "largest child's peak RSS MiB | tree peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['pipeline']} | {r['images']} | {r['first_step_s']:.1f} | "
            f"{r['main_peak_rss_mib']:.0f} | {r['worker_peak_rss_mib']:.0f} | "
            f"{r['tree_peak_rss_mib']:.0f} |"
        )
    for pipeline, growth in result["growth"].items():
        print(
            f"| {pipeline} | **{growth['to']}/{growth['from']}** | "
            f"**{growth['first_step_s']:.2f}x** | **{growth['main_peak_rss_mib']:.2f}x** | "
            f"**{growth['worker_peak_rss_mib']:.2f}x** | **{growth['tree_peak_rss_mib']:.2f}x** |"
        )
    stream_growth = result["growth"]["stream"]
    flat = all(abs(stream_growth[key] - 1) <= FLAT for key in GROWTH_KEYS)
    print(
        f"\nStream mode {'stays' if flat else 'does NOT stay'} flat within "
        f"{FLAT:.0%} from {stream_growth['from']} to {stream_growth['to']} train images."
    )


def growth(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pipeline, each figure at the largest size over the smallest."""
    result = {}
    for pipeline in ("memory", "stream"):
        mine = sorted((r for r in rows if r["pipeline"] == pipeline), key=lambda r: r["images"])
        small, large = mine[0], mine[-1]
        result[pipeline] = {"from": small["images"], "to": large["images"]} | {
            key: large[key] / small[key] if small[key] else 1.0 for key in GROWTH_KEYS
        }
    return result


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program: importing this module, as grain's
    workers do, adds no flags)."""
    from experiments import harness  # imports JAX: not in the workers

    flags.DEFINE_string("folder", "", "Use this folder (train/ and test/<class>/*.jpg).")
    flags.DEFINE_integer("images", 2048, "JPEGs to write (without --folder).")
    flags.DEFINE_integer("classes", 10, "Classes of the JPEGs written.")
    flags.DEFINE_list("workers", ["1", "2"], "Worker counts, comma-separated.")
    flags.DEFINE_integer("batch_size", 128, "Images per batch.")
    flags.DEFINE_integer("rounds", 2, "Runs of each side per worker count.")
    flags.DEFINE_integer("windows", 3, "Timed windows per run.")
    flags.DEFINE_integer("window_batches", 2, "Batches per worker per window.")
    flags.DEFINE_enum("step_model", "resnet50", list(harness.MODELS), "The train step's model.")
    flags.DEFINE_integer("step_batch_size", 32, "The train step's batch size.")
    flags.DEFINE_integer("step_image_size", 224, "The train step's image size.")
    flags.DEFINE_bool("no_step", False, "Skip the train-step timing.")
    flags.DEFINE_bool("startup", False, "Measure memory and start-up instead.")
    flags.DEFINE_list("startup_sizes", ["1000", "8000"], "Train JPEGs per folder, comma-separated.")
    flags.DEFINE_integer("startup_steps", 3, "Train steps per run.")
    flags.DEFINE_integer("startup_workers", 2, "Stream mode's workers.")
    flags.DEFINE_bool("quick", False, "Tiny sizes: proves the script runs.")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
    for name in ("workers", "startup_sizes"):
        flags.register_validator(
            name, lambda counts: all(c.isdigit() for c in counts), "takes whole numbers, e.g. 1,2"
        )


def settings() -> SimpleNamespace:
    """The flags' values, with --quick's tiny sizes in place of the sizes (they win) and the
    comma-separated counts as numbers."""
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.quick:
        args.images, args.batch_size = 64, 8
        args.rounds, args.windows, args.window_batches = 1, 2, 1
        args.step_model, args.step_batch_size, args.step_image_size = "resnet20", 2, 32
        args.startup_sizes, args.startup_steps = ["64", "128"], 2
    args.startup_sizes = [int(size) for size in args.startup_sizes]
    args.workers = [int(workers) for workers in args.workers]
    return args


def folder_stats(root: Path) -> dict[str, float]:
    listing, _ = data.list_folder(root)
    paths = listing["train"].paths
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


def throughput(args: SimpleNamespace, result: dict[str, Any], tmp: Path) -> None:
    """The pipelines at each worker count, then the train step."""
    root = Path(args.folder) if args.folder else tmp
    if not args.folder:
        print(f"... writing {args.images} JPEGs", file=sys.stderr, flush=True)
        make_jpeg_folder(root, args.images, args.classes)
    result["folder"] = folder_stats(root)
    needed = warmup_batches(max(args.workers)) + args.windows * args.window_batches * max(
        args.workers
    )
    if result["folder"]["images"] // args.batch_size < needed:
        sys.exit(
            f"One epoch of {result['folder']['images']} images in batches of {args.batch_size} "
            f"is shorter than the {needed} batches a run reads: write more --images or lower "
            "--batch_size, --windows or --window_batches."
        )
    for workers in args.workers:
        result["rows"].append(compare(args, root, workers))
    if not args.no_step:
        print(f"... {args.step_model} train step", file=sys.stderr, flush=True)
        result["step"] = train_step_img_s(
            args.step_model, args.step_batch_size, args.step_image_size, args.windows
        )


def main(argv: list[str]) -> None:
    """Measures throughput (or, with --startup, memory and start-up), prints the report and
    writes the JSON."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}. Run with --help to see the flags.")
    args = settings()
    cpu.setup_if_cpu()  # before JAX starts a backend, as the command lines do
    result: dict[str, Any] = {
        "command": " ".join(
            [".venv/bin/python", "-m", "experiments.pipeline_benchmark", *sys.argv[1:]]
        ),
        "batch_size": args.batch_size,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="pipeline_benchmark_") as tmp:
        if args.startup:
            result.update(steps=args.startup_steps, stream_workers=args.startup_workers)
            result["rows"] = startup_rows(args, Path(tmp))
            result["growth"] = growth(result["rows"])
            result["load_avg_1min"] = os.getloadavg()[0]
        else:
            throughput(args, result, Path(tmp))
    (print_startup_report if args.startup else print_report)(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
