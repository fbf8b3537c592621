"""ResNet-20 on Fashion-MNIST in plain PyTorch on the CPU: the baseline the project's run is timed
against, side by side on the same machine. It does not import resnet_jax.

What a PyTorch user would write to train this recipe fast on a CPU, in one file: the four idx .gz
files read into memory as uint8 tensors (no DataLoader, no workers), augmentation vectorised over
the batch in torch, and He et al.'s (2015, §4.2) ResNet-20 with option A shortcuts (strided
subsampling + zero-padded channels), widths 16/32/64, 1 input channel, initialised as torchvision's
resnet (convs kaiming_normal fan_out/relu, BN weight 1 bias 0, Linear torch's default).

Per training batch: zero padding by --crop_padding and a random crop back to 28x28, a random
horizontal flip (both one gather on the uint8 batch), normalization by the mean/std of the
training images (measured at start-up and printed), then optional random erasing with timm's
semantics (--random_erasing P). SGD with momentum 0.9 (--nesterov), weight decay on every
parameter as torch's SGD does it (--no_decay_bn_bias: conv/linear weights only), the learning rate
set every step: --schedule step (x0.1 at each of --milestones epochs; empty: at 50% and 75% of the
run, which is 150,225 at 300 epochs) or --schedule cosine (to 0, after --warmup_epochs of linear
warmup from 0). Each epoch drops its last partial batch (60000 // 128 = 468 steps).

Timing: the clock starts at the top of this file, before torch is imported, and stops when the
final test accuracy is known, so start-up (imports, reading the data), every epoch, every
evaluation and the final test all count. The JSON summary's "wall_s" is that span;
"wall_from_process_start_s" adds the interpreter's own start-up (from /proc/self/stat on Linux).
`/usr/bin/time -v python -m experiments.torch_fashion ...` gives the whole process, exit included.
One line per epoch goes to stdout, then the summary as one JSON line (also written to --json).
Time it on an idle machine: torch uses os.cpu_count() threads, and where other processes hold the
cores its threads wait on each other (on a 2-core machine at load ~5, a step took 2.3 s with 2
threads and 0.5 s with --threads 1).

The published protocol (step schedule: lr 0.1 for batch 128, /10 at epochs 150 and 225 of 300),
evaluated on the test split every epoch as the project's run is:
  python -m experiments.torch_fashion --epochs 300 --schedule step --milestones 150,225 \\
      --eval_every_epoch --json torch_fashion.json
He et al.'s own length and weight decay, as configs/resnet20.py has them (64k steps, /10 at 32k
and 48k):
  python -m experiments.torch_fashion --num_steps 64000 --milestones= --weight_decay 1e-4 \\
      --eval_every_epoch
A short recipe (cosine, 1 warmup epoch, 15 epochs):
  python -m experiments.torch_fashion --epochs 15 --schedule cosine --warmup_epochs 1 \\
      --eval_every_epoch --json torch_fashion_15.json
A check that it runs (512 train / 256 test images, 1 epoch; not a result):
  python -m experiments.torch_fashion --quick
"""

import time

START = time.time()  # before torch is imported: start-up counts

import gzip  # noqa: E402  (imports after the clock starts, on purpose)
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from torch import nn  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_CLASSES = 10
FLAG_NAMES: list[str] = []  # this script's flags (the summary's "args"), once defined
QUICK = {"limit_train": 512, "limit_test": 256, "epochs": 1, "num_steps": 0}


def define_flags() -> None:
    """The command line. Defined only when run as a script, so that importing this module (the
    tests do) adds no flags beside the other experiments' own."""
    absl_own = set(FLAGS)
    flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Where the four Fashion-MNIST .gz files are.")
    flags.DEFINE_integer("depth", 20, "6n+2: 20, 32, 56, 110 (n BasicBlocks per stage).")
    flags.DEFINE_integer("epochs", 300, "Training epochs (each drops its last partial batch).")
    flags.DEFINE_integer("num_steps", 0, "Train this many steps instead of --epochs (if > 0).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_integer("eval_batch_size", 1000, "Evaluation batch size.")
    flags.DEFINE_float("lr", 0.1, "Peak learning rate (0.1 is for batch 128).")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.")
    flags.DEFINE_float("weight_decay", 5e-4, "SGD weight decay (torch's: added to the gradient).")
    flags.DEFINE_bool("no_decay_bn_bias", False, "No weight decay on BN parameters and biases.")
    flags.DEFINE_enum("schedule", "step", ["step", "cosine"], "Learning-rate schedule, per step.")
    flags.DEFINE_list(
        "milestones",
        [],
        "step: epochs where the lr is x --gamma; empty: at 50% and 75% of the run.",
    )
    flags.DEFINE_float("gamma", 0.1, "step: the factor at each milestone.")
    flags.DEFINE_float("warmup_epochs", 0.0, "Linear warmup from 0, in epochs (either schedule).")
    flags.DEFINE_float("label_smoothing", 0.0, "Cross-entropy label smoothing.")
    flags.DEFINE_integer("crop_padding", 4, "Zero padding before the random 28x28 crop (0: none).")
    flags.DEFINE_bool("flip", True, "Random horizontal flip.")
    flags.DEFINE_float("random_erasing", 0.0, "Probability of random erasing (timm's, fill 0).")
    flags.DEFINE_float("erasing_min_area", 0.02, "Random erasing: smallest area fraction.")
    flags.DEFINE_float("erasing_max_area", 0.4, "Random erasing: largest area fraction.")
    flags.DEFINE_float("erasing_min_aspect", 0.3, "Random erasing: aspect in (this, 1/this).")
    flags.DEFINE_float("val_fraction", 0.0, "Hold out this fraction of train (stratified).")
    flags.DEFINE_bool("eval_every_epoch", False, "Evaluate on the test split after every epoch.")
    flags.DEFINE_bool("tta_flip", False, "Also report test accuracy with flip TTA (mean logits).")
    flags.DEFINE_bool("bf16", False, "torch.autocast('cpu', bfloat16) for forward passes.")
    flags.DEFINE_bool("channels_last", False, "Model and inputs in channels_last memory format.")
    flags.DEFINE_integer("threads", 0, "torch threads; 0: os.cpu_count().")
    flags.DEFINE_integer("seed", 0, "Seed for the initialization, shuffling and augmentation.")
    flags.DEFINE_integer("limit_train", 0, "Use only the first N train images (0: all).")
    flags.DEFINE_integer("limit_test", 0, "Use only the first N test images (0: all).")
    flags.DEFINE_bool("quick", False, f"A check that it runs: {QUICK}.")
    flags.DEFINE_string("json", None, "Also write the JSON summary here.")
    FLAG_NAMES.extend(sorted(set(FLAGS) - absl_own))


# --- Data ----------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped) as a uint8 array: 2 zero bytes, type 0x08, ndim, then ndim big-endian
    uint32 dims, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        raise ValueError(f"{path}: {array.size} bytes of data for dims {dims}")
    return array.reshape(dims)


def load_split(data_dir: Path, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)), the first `limit` if limit > 0."""
    images, labels = (read_idx(data_dir / name) for name in FILES[split])
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if limit:
        images, labels = images[:limit], labels[:limit]
    images = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: frombuffer is read-only
    return images, torch.from_numpy(labels.astype(np.int64))


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train indices, val indices): round(fraction * n_c) of each class c to val, seeded."""
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    train, val = [], []
    for c in np.unique(labels_np):
        idx = rng.permutation(np.flatnonzero(labels_np == c))
        k = round(fraction * len(idx))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NCHW images in [0, 1] units, exact, from a
    256-bin histogram per channel."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64)
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].numpy().ravel(), minlength=256).astype(np.float64)
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(float(mean / 255.0))
        stds.append(float(math.sqrt(var) / 255.0))
    return means, stds


# --- Augmentation (vectorised over the batch) ----------------------------------------------------


def crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop of each NCHW image after zero padding by `padding`, back to its size, and a
    random horizontal flip with probability 1/2: one gather for the whole batch."""
    batch, channels, height, width = images.shape
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
    rows = top + torch.arange(height)  # (B, H)
    cols = torch.arange(width).expand(batch, width)
    if flip:
        mirror = torch.rand(batch, 1, generator=generator) < 0.5
        cols = torch.where(mirror, width - 1 - cols, cols)
    cols = left + cols  # (B, W)
    b = torch.arange(batch).view(batch, 1, 1, 1)
    c = torch.arange(channels).view(1, channels, 1, 1)
    return images[b, c, rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]


def random_erasing(
    images: torch.Tensor,
    probability: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> torch.Tensor:
    """timm's RandomErasing (mode "const": fill 0, i.e. the mean after normalization, one box) on
    normalized NCHW images, in place, for the whole batch at once. Each image is erased with
    `probability`: its box takes the first of `attempts` draws (area fraction U(area), log-uniform
    aspect in (min_aspect, 1/min_aspect)) that fits, placed uniformly; none fits: not erased."""
    batch, _, height, width = images.shape
    target = torch.empty(batch, attempts).uniform_(*area, generator=generator) * (height * width)
    log_aspect = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(torch.empty(batch, attempts).uniform_(*log_aspect, generator=generator))
    h = torch.round(torch.sqrt(target * aspect)).long()
    w = torch.round(torch.sqrt(target / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first that fits (ties: first index)
    h, w = h.gather(1, first), w.gather(1, first)  # (B, 1)
    erase = (torch.rand(batch, 1, generator=generator) < probability) & fits.any(1, keepdim=True)
    top = (torch.rand(batch, 1, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(batch, 1, generator=generator) * (width - w + 1)).long()
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= top) & (rows < top + h) & erase  # (B, H)
    in_cols = (cols >= left) & (cols < left + w)  # (B, W)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill_(mask, 0.0)


class Normalize:
    """uint8 NCHW -> float32 (x / 255 - mean) / std per channel, as one multiply-add."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool):
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean).view(1, -1, 1, 1) / std_t
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


# --- Model ---------------------------------------------------------------------------------------


def shortcut_a(x: torch.Tensor, stride: int, out_channels: int) -> torch.Tensor:
    """He et al.'s option A: strided subsampling, then zero channels appended up to out_channels."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.out_channels = stride, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + shortcut_a(x, self.stride, self.out_channels))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. §4.2: 3x3 stem, 3 stages of n BasicBlocks at 16/32/64 channels
    (stride 2 at the first block of stages 2 and 3), global average pool, linear head."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(n):
                blocks.append(BasicBlock(channels, width, 2 if stage and not index else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's resnet initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- Schedule, evaluation ------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, total: int, warmup: int, schedule: str, boundaries) -> float:
    """The learning rate of step `step` (0-based) of `total`: linear warmup from 0 over `warmup`
    steps, then cosine to 0 over the rest, or x gamma at each boundary step (`boundaries`: a list
    of (step, gamma))."""
    if step < warmup:
        return base_lr * step / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * math.prod(gamma for boundary, gamma in boundaries if step >= boundary)


@torch.inference_mode()
def predict(model, images, normalize, batch_size: int, bf16: bool, flip: bool = False):
    """Logits (float32) of all `images` in eval mode; of their mirror images if `flip`."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size])
        if flip:
            x = x.flip(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


# --- Main ----------------------------------------------------------------------------------------


def process_start_time() -> float | None:
    """When this process started, as a time.time() value (Linux /proc; None elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22, starttime, counted after the ") state"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv) -> None:
    del argv
    process_start = process_start_time()
    load_start = os.getloadavg()[0]
    args = {name: FLAGS[name].value for name in FLAG_NAMES}
    if args["quick"]:
        args.update(QUICK)
    threads = args["threads"] or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args["seed"])
    generator = torch.Generator().manual_seed(args["seed"])

    data_dir = Path(args["data_dir"])
    train_images, train_labels = load_split(data_dir, "train", args["limit_train"])
    test_images, test_labels = load_split(data_dir, "test", args["limit_test"])
    val_images = val_labels = None
    if args["val_fraction"] > 0:
        train_idx, val_idx = stratified_split(train_labels, args["val_fraction"], args["seed"])
        val_images, val_labels = train_images[val_idx], train_labels[val_idx]
        train_images, train_labels = train_images[train_idx], train_labels[train_idx]
    mean, std = channel_stats(train_images)
    print(f"train images: mean {[round(m, 4) for m in mean]} std {[round(s, 4) for s in std]}")
    normalize = Normalize(mean, std, args["channels_last"])

    batch_size, num_train = args["batch_size"], len(train_images)
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise app.UsageError(f"{num_train} train images make no batch of {batch_size}")
    total_steps = args["num_steps"] or args["epochs"] * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = round(args["warmup_epochs"] * steps_per_epoch)
    milestones = [float(m) for m in args["milestones"]]
    boundaries = (
        [(round(m * steps_per_epoch), args["gamma"]) for m in milestones]
        if milestones
        else [(total_steps // 2, args["gamma"]), (total_steps * 3 // 4, args["gamma"])]
    )
    if args["schedule"] == "step" and any(step >= total_steps for step, _ in boundaries):
        raise app.UsageError(
            f"--milestones {','.join(args['milestones'])} (epochs) are not all inside this run "
            f"of {epochs} epochs; --milestones= puts them at 50% and 75% of it"
        )
    print(
        f"{num_train} train / {0 if val_images is None else len(val_images)} val / "
        f"{len(test_images)} test images; {epochs} epochs of {steps_per_epoch} steps "
        f"({total_steps} steps), batch {batch_size}, {threads} threads, torch {torch.__version__}"
    )

    model = CifarResNet(args["depth"], train_images.shape[1], NUM_CLASSES)
    if args["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if args["no_decay_bn_bias"]:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = torch.optim.SGD(
        groups,
        lr=args["lr"],
        momentum=args["momentum"],
        nesterov=args["nesterov"],
        weight_decay=args["weight_decay"],
    )
    erasing_area = (args["erasing_min_area"], args["erasing_max_area"])
    bf16, eval_bs = args["bf16"], args["eval_batch_size"]

    history, train_s, eval_s, step = [], 0.0, 0.0, 0
    test_logits = None
    train_start = time.time()
    for epoch in range(1, epochs + 1):
        epoch_start = time.time()
        model.train()
        order = torch.randperm(num_train, generator=generator)
        steps = min(steps_per_epoch, total_steps - step)
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.int64)
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = crop_flip(train_images[idx], args["crop_padding"], args["flip"], generator)
            x = normalize(x)
            if args["random_erasing"] > 0:
                x = random_erasing(
                    x, args["random_erasing"], generator, erasing_area, args["erasing_min_aspect"]
                )
            y = train_labels[idx]
            lr = lr_at(step, args["lr"], total_steps, warmup, args["schedule"], boundaries)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=args["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float()
            correct += (logits.detach().argmax(1) == y).sum()
            step += 1
        epoch_train_s = time.time() - epoch_start
        train_s += epoch_train_s

        eval_start = time.time()
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / steps,
            "train_acc": correct.item() / (steps * batch_size),
            "lr": lr,
        }
        if val_images is not None:
            val_logits = predict(model, val_images, normalize, eval_bs, bf16)
            record["val_acc"] = accuracy(val_logits, val_labels)
        test_logits = None
        if args["eval_every_epoch"] or epoch == epochs:  # the last epoch's is the final test
            test_logits = predict(model, test_images, normalize, eval_bs, bf16)
            record["test_acc"] = accuracy(test_logits, test_labels)
        epoch_eval_s = time.time() - eval_start
        eval_s += epoch_eval_s
        record.update(train_s=epoch_train_s, eval_s=epoch_eval_s)
        history.append(record)
        print(
            f"epoch {epoch}/{epochs}  train_loss {record['train_loss']:.4f}  "
            f"train_acc {record['train_acc']:.4f}"
            + (f"  val_acc {record['val_acc']:.4f}" if "val_acc" in record else "")
            + (f"  test_acc {record['test_acc']:.4f}" if "test_acc" in record else "")
            + f"  lr {lr:.5f}  train_s {epoch_train_s:.1f}  eval_s {epoch_eval_s:.1f}",
            flush=True,
        )
    end = time.time()  # the final test accuracy is known
    test_acc = history[-1]["test_acc"]

    summary = {
        "wall_s": end - START,
        "wall_from_process_start_s": None if process_start is None else end - process_start,
        "startup_s": train_start - START,
        "train_s": train_s,
        "eval_s": eval_s,
        "test_accuracy": test_acc,
    }
    if args["tta_flip"]:
        tta_start = time.time()
        flipped = predict(model, test_images, normalize, eval_bs, bf16, flip=True)
        summary["test_accuracy_tta_flip"] = accuracy((test_logits + flipped) / 2, test_labels)
        summary["tta_s"] = time.time() - tta_start  # after the clock stopped: not in wall_s
    summary.update(
        {
            "final_val_accuracy": history[-1].get("val_acc"),
            "epochs": epochs,
            "steps": total_steps,
            "num_train": num_train,
            "num_val": 0 if val_images is None else len(val_images),
            "num_test": len(test_images),
            "mean": mean,
            "std": std,
            "args": args,
            "torch_version": torch.__version__,
            "threads": threads,
            "cpu_model": cpu_model(),
            "loadavg_1min_start": load_start,
            "loadavg_1min_end": os.getloadavg()[0],
            "history": history,
        }
    )
    line = json.dumps(summary)
    print(line, flush=True)
    if args["json"]:
        Path(args["json"]).write_text(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
