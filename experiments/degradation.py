"""Plain vs residual nets at depths 20, 32, 44, 56 (110 and 1202 on request): He et al. Fig. 6.

He et al. (2015) trained plain nets (the same layers without shortcuts) and ResNets on CIFAR-10:
the deeper plain nets have HIGHER training and test error (the degradation problem), while the
deeper ResNets have lower error (ResNet-20/32/44/56/110: 8.75/7.51/7.17/6.97/6.43% test error)
until ResNet-1202 (7.93%), which overfits. Every arm uses the paper's recipe (configs/resnet20.py:
SGD, lr 0.1 /10 at 32k and 48k, 64k iterations, batch 128, crop + flip); the 110- and 1202-layer
nets add the paper's warmup. Depth 1202 is a ResNet arm only, as in the paper's Table 6.

Each epoch is evaluated on the test split (configs/resnet20.py trains on all 50k images with no
validation split and reports the final model, as the paper does), so error_curves.png shows
training (dashed) and test (solid) error against epoch, plain nets left and ResNets right, one
colour per depth; error_vs_depth.png gives the final test error of both families against depth.

  --depths=20,32,44,56 (default; --quick: 20,32)   --depths=20,32,44,56,110,1202 adds 110 and 1202

Full scale (a GPU: eight runs of 64k iterations, ten with 110, eleven with 1202; ResNet-1202's
memory and time are in docs/EXPERIMENTS.md):
  python -m experiments.degradation --data_dir ~/tensorflow_datasets
  python -m experiments.degradation --data_dir ~/tensorflow_datasets --depths=20,32,44,56,110,1202
Quick check that it runs (minutes on a CPU; width-4 nets, not a result):
  python -m experiments.degradation --quick --out workdirs/degradation_quick
Writes <out>/results.csv, results.md, curves.png, test_accuracy.png, error_curves.png and
error_vs_depth.png; a rerun resumes.
"""

from pathlib import Path

from absl import flags

from experiments import study_figures, sweep

flags.adopt_module_key_flags(sweep)  # --help lists the study flags

FLAGS = flags.FLAGS
DEPTHS = (20, 32, 44, 56, 110, 1202)  # the He et al. CIFAR nets this study knows
RESNET_ONLY_DEPTHS = (1202,)  # the paper trained no plain twin this deep
FULL_DEPTHS, QUICK_DEPTHS = [20, 32, 44, 56], [20, 32]
DEPTH_COLORS = {
    20: "#1f77b4", 32: "#ff7f0e", 44: "#2ca02c", 56: "#d62728", 110: "#9467bd", 1202: "#8c564b",
}  # fmt: skip
# He et al. (2015), Table 6: CIFAR-10 test error (%) of the ResNets (110: best of 5 runs).
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
flags.DEFINE_list(
    "depths", None, f"Depths to train, of {DEPTHS} (default {FULL_DEPTHS}; --quick {QUICK_DEPTHS})."
)


def depths() -> list[int]:
    if not FLAGS.depths:
        return QUICK_DEPTHS if FLAGS.quick else FULL_DEPTHS
    try:
        chosen = [int(d) for d in FLAGS.depths]
    except ValueError:
        chosen = []
    if not chosen or any(d not in DEPTHS for d in chosen):
        raise sweep.SweepError(f"--depths takes depths of {DEPTHS}, got {FLAGS.depths}.")
    return chosen


def arms() -> list[sweep.Arm]:
    result = []
    for residual in (False, True):
        for depth in depths():
            if not residual and depth in RESNET_ONLY_DEPTHS:
                continue
            overrides = {"model.name": f"resnet{depth}", "model.residual": residual}
            if depth >= 110:  # the paper's warmup for its deepest nets (configs/resnet110.py)
                overrides["schedule.warmup_epochs"] = 1.0
            result.append(
                sweep.Arm(
                    f"{'resnet' if residual else 'plain'}{depth}",
                    f"{'ResNet' if residual else 'plain'}-{depth}",
                    overrides,
                    color=DEPTH_COLORS[depth],
                    dashed=not residual,
                )
            )
    return result


def depth_of(result: sweep.ArmResult) -> int:
    return int(result.arm.overrides["model.name"].removeprefix("resnet"))


def error_curves(results: list[sweep.ArmResult], out: Path) -> list[Path]:
    """He et al. Fig. 6: training (dashed) and test (solid) error against epoch, by family."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    ends_by_ax = []
    for ax, residual, title in ((axes[0], False, "Plain networks"), (axes[1], True, "ResNets")):
        family = [r for r in results if r.arm.overrides["model.residual"] == residual]
        ends = []
        ends_by_ax.append((ax, ends))
        for result in sorted(family, key=depth_of):
            split = result.eval_split
            for key, style, width in (
                ("train_accuracy", "--", 1.0),
                (f"{split}_accuracy", "-", 2.0),
            ):
                x, y = result.series(key)
                if x:
                    error = [100 * (1 - v) for v in y]
                    marker = "o" if len(x) < 12 else None
                    ax.plot(x, error, style, color=result.color, linewidth=width, marker=marker,
                            markersize=3)  # fmt: skip
                    if style == "-":
                        ends.append((x[-1], error[-1], result.arm.label, result.color))
        ax.set(title=study_figures.quick_mark(title, results), xlabel="Epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax, ends in ends_by_ax:  # once both panels are drawn: the shared y limits are final
        study_figures.label_line_ends(ax, ends)
    split = {r.eval_split for r in results if r.epochs}
    held_out = "test" if split == {"test"} else "validation"
    axes[0].set_ylabel(f"Error (%): training dashed, {held_out} solid")
    styles = [
        Line2D([], [], color="black", linestyle="--", linewidth=1.0, label="training error"),
        Line2D([], [], color="black", linestyle="-", linewidth=2.0, label=f"{held_out} error"),
    ]
    axes[1].legend(handles=styles, loc="upper right", fontsize=8)
    fig.suptitle("Plain vs residual nets on CIFAR-10 (He et al. 2015, Fig. 6); colour = depth")
    fig.tight_layout()
    fig.subplots_adjust(right=0.9, wspace=0.25)
    path = out / "error_curves.png"
    study_figures.save_figure(fig, path)
    return [path, error_vs_depth(results, out)]


def error_vs_depth(results: list[sweep.ArmResult], out: Path) -> Path:
    """Final test error against depth: plain (dashed) and ResNet (solid), the paper's ResNets."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for residual, label in ((False, "plain nets"), (True, "ResNets")):
        points = sorted(
            (depth_of(r), 100 * (1 - r.results["test_accuracy"]))
            for r in results
            if r.results and r.arm.overrides["model.residual"] == residual
        )
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, "-" if residual else "--", color="black", linewidth=1.2)
            for depth, error in points:  # plain: hollow squares; ResNets: filled circles
                ax.plot(depth, error, "o" if residual else "s", markersize=6 if residual else 12,
                        color=DEPTH_COLORS[depth], markerfacecolor=None if residual else "white",
                        markeredgewidth=2)  # fmt: skip
            ax.annotate(f"{label} (final)", (x[-1], y[-1]), xytext=(8, -9 if residual else 9),
                        textcoords="offset points", va="center", fontsize=9)  # fmt: skip
    paper = sorted(PAPER_TEST_ERROR.items())
    ax.plot(*zip(*paper, strict=True), ":", color="gray", marker="x", linewidth=1.0)
    ax.annotate("He et al.'s ResNets", paper[-1], xytext=(6, 0), textcoords="offset points",
                va="center", fontsize=9, color="gray")  # fmt: skip
    ax.set(
        title=study_figures.quick_mark("Final test error against depth", results),
        xlabel="Depth (layers)",
        ylabel="Test error (%)",
        xscale="log",  # 20 to 1202 layers
        xlim=(15, 2000),  # room for the labels right of the last points
    )
    depths_shown = sorted({depth_of(r) for r in results} | set(PAPER_TEST_ERROR))
    ax.set_xticks(depths_shown, [str(d) for d in depths_shown])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "error_vs_depth.png"
    study_figures.save_figure(fig, path)
    return path


STUDY = sweep.Study(
    name="degradation",
    title="Plain vs residual nets by depth (He et al. 2015, Fig. 6)",
    base_config="configs/resnet20.py",
    arms=arms,
    figures=error_curves,
    full_command="python -m experiments.degradation --data_dir ~/tensorflow_datasets",
    note="Every arm: He et al.'s CIFAR recipe (configs/resnet20.py) at its depth, with or without "
    "shortcuts, trained on all training images and evaluated on the test split every epoch (as "
    "the paper's Fig. 6). Paper (Table 6): ResNet-20/32/44/56/110/1202 at "
    "8.75/7.51/7.17/6.97/6.43/7.93% test error; the plain nets get worse with depth.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
