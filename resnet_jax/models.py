"""ResNets in Flax linen: torchvision's ImageNet family and He et al. (2015)'s CIFAR family.

One parametric `ResNet` covers every depth from a table of stage sizes. Submodule names follow
torchvision's state_dict (`conv1`, `bn1`, `layer2_0`, `downsample_conv`, `fc`) so pretrained weights
map one to one, and every padding is explicit and symmetric as in torch (XLA's 'SAME' pads the high
side on stride 2, which would shift every feature map against torchvision's).

The conv, norm and pool are fields: plain Flax by default (`nn.Conv`, `layers.BatchNorm`, which
is flax's with torch's running variance, and `nn.max_pool`). `get_model(kernels=...)` fills them
with the kernel set `resnet_jax.cpu.kernels.kernel_modules` chooses: plain Flax, or the CPU kernel
set, which has the same variables and numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.cpu.kernels import kernel_modules
from resnet_jax.layers import BatchNorm

ModuleDef = Any
Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")


def shortcut(x: jax.Array, filters: int, strides: int, kind: str, conv: ModuleDef, norm: ModuleDef):
    """The identity path of a block, made to match the residual branch's shape when it changes.

    kind "B": 1x1 strided projection + BN (torchvision's `downsample`); kind "A": strided
    subsampling with zero-padded extra channels (He et al.'s parameter-free option).
    """
    if strides == 1 and x.shape[-1] == filters:
        return x
    if kind == "B":
        x = conv(filters, (1, 1), strides, padding=((0, 0), (0, 0)), name="downsample_conv")(x)
        return norm(name="downsample_bn")(x)
    x = x[:, ::strides, ::strides, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, filters - x.shape[-1])))


def drop_path(y: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """Stochastic depth: zero a block's residual branch `y` for a random `rate` of the examples and
    scale the rest by 1 / (1 - rate); `y` as is when `deterministic` or rate 0.

    The mask is drawn from the "dropout" rng, one draw per example (broadcast over H, W, C).
    """
    return nn.Dropout(rate, broadcast_dims=(1, 2, 3))(y, deterministic=deterministic)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets). `drop_path_rate`: stochastic depth of the
    residual branch at training (`deterministic=False`)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: str = "B"
    residual: bool = True
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(scale_init=last_scale_init, name="bn2")(y)
        y = drop_path(y, self.drop_path_rate, deterministic)
        if self.residual:
            y = y + shortcut(x, self.filters, self.strides, self.shortcut, self.conv, self.norm)
        return nn.relu(y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision v1.5), 1x1 expand by 4 (ResNet-50+).
    `drop_path_rate`: as BasicBlock's."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: str = "B"
    residual: bool = True
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        out_filters = self.filters * self.expansion
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.conv(self.filters, (1, 1), 1, padding=((0, 0), (0, 0)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out_filters, (1, 1), 1, padding=((0, 0), (0, 0)), name="conv3")(y)
        y = self.norm(scale_init=last_scale_init, name="bn3")(y)
        y = drop_path(y, self.drop_path_rate, deterministic)
        if self.residual:
            y = y + shortcut(x, out_filters, self.strides, self.shortcut, self.conv, self.norm)
        return nn.relu(y)


class ResNet(nn.Module):
    """A ResNet from a table of stage sizes; `apply(v, x, train=False)` returns float32 logits.

    Stage i (1-based) has `stage_sizes[i-1]` blocks of width `stage_widths[i-1]`; every stage after
    the first halves the resolution. `frozen_stages=k` runs the stem and stages 1..k with BN in
    inference mode and stops gradients at their output (k=-1: nothing frozen, 0: the stem only).
    `drop_path_rate`: stochastic depth at training, rising linearly over the blocks from 0 at the
    first to this rate at the last (timm's ResNet); frozen stages never drop. Dropping draws from
    the "dropout" rng, which `apply(..., train=True, rngs={"dropout": key})` must then pass.
    Stage outputs are sown into the "intermediates" collection as `stem`, `layer1`, ...
    `conv`, `norm` and `pool` build the layers: `nn.Conv`, `BatchNorm` and `nn.max_pool` or
    anything called like them (positional window, strides and explicit padding for `pool`).
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    stem: str = "imagenet"
    stem_width: int = 64
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    shortcut: str = "B"
    residual: bool = True
    zero_init_residual: bool = False
    frozen_stages: int = -1
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    bn_momentum: float = 0.9  # torch's momentum=0.1 weighs the new batch; flax's weighs the old
    bn_epsilon: float = 1e-5
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    pool: Callable[..., jax.Array] = nn.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(
            self.conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )  # fmt: skip
        norm_for = functools.partial(
            self.norm, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=self.param_dtype, axis_name=self.axis_name,
        )  # fmt: skip

        def norm_at(stage: int) -> ModuleDef:
            frozen = stage <= self.frozen_stages
            return functools.partial(norm_for, use_running_average=frozen or not train)

        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.stem_width, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1")(x)
            x = nn.relu(norm_at(0)(name="bn1")(x))
            x = self.pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        else:
            x = conv(self.stem_width, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv1")(x)
            x = nn.relu(norm_at(0)(name="bn1")(x))
        x = self._freeze_boundary(x, 0)
        self.sow("intermediates", "stem", x)

        block_rates = iter(drop_path_rates(self.stage_sizes, self.drop_path_rate))
        for stage, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True), start=1
        ):
            for index in range(num_blocks):
                x = self.block_cls(
                    filters=width,
                    conv=conv,
                    norm=norm_at(stage),
                    strides=2 if stage > 1 and index == 0 else 1,
                    shortcut=self.shortcut,
                    residual=self.residual,
                    zero_init_residual=self.zero_init_residual,
                    drop_path_rate=next(block_rates),
                    name=f"layer{stage}_{index}",
                )(x, deterministic=stage <= self.frozen_stages or not train)
            x = self._freeze_boundary(x, stage)
            self.sow("intermediates", f"layer{stage}", x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=dense_kernel_init, bias_init=dense_bias_init(x.shape[-1]), name="fc",
        )(x)  # fmt: skip
        return x.astype(jnp.float32)

    def _freeze_boundary(self, x: jax.Array, stage: int) -> jax.Array:
        # Frozen layers get no gradient, so the backward pass stops at the last frozen stage.
        last_frozen = min(self.frozen_stages, len(self.stage_sizes))  # k past the last stage: all
        return jax.lax.stop_gradient(x) if stage == last_frozen else x


def drop_path_rates(stage_sizes: Sequence[int], rate: float) -> list[float]:
    """Each block's stochastic-depth rate, in order: block i of n gets rate * i / (n - 1), from 0 at
    the first block to `rate` at the last (timm's ResNet `drop_path_rate`)."""
    num_blocks = sum(stage_sizes)
    return [rate * index / max(num_blocks - 1, 1) for index in range(num_blocks)]


class CifarResNet(ResNet):
    """He et al. (2015) §4.2 CIFAR ResNets: 6n+2 layers, widths 16/32/64, shortcut A by default."""

    block_cls: ModuleDef = BasicBlock
    stem: str = "cifar"
    stem_width: int = 16
    stage_widths: Sequence[int] = (16, 32, 64)
    shortcut: str = "A"


# torchvision's table: block type and blocks per stage.
IMAGENET_FAMILY: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
# He et al.'s table: n blocks per stage for depth 6n+2.
CIFAR_FAMILY: dict[str, int] = {
    "resnet20": 3,
    "resnet32": 5,
    "resnet44": 7,
    "resnet56": 9,
    "resnet110": 18,
    "resnet1202": 200,
}
MODEL_NAMES: tuple[str, ...] = (*IMAGENET_FAMILY, *CIFAR_FAMILY)


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        valid = ", ".join(map(str, choices))
        raise ValueError(f"Unknown {what} {value!r}; valid choices are: {valid}.")


def get_model(
    name: str,
    num_classes: int = 1000,
    *,
    stem: str | None = None,
    shortcut: str | None = None,
    residual: bool = True,
    width: int | None = None,
    zero_init_residual: bool = False,
    frozen_stages: int = -1,
    drop_path_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
    axis_name: str | None = None,
    kernels: str = "auto",
) -> ResNet:
    """Build a ResNet by name: resnet18/34/50/101/152 or He et al.'s resnet20/32/44/56/110/1202.

    `stem`: "imagenet" (7x7/2 conv + max-pool, default) or "cifar" (3x3/1 conv, no pool) for the
    ImageNet family; the CIFAR family always has its own 3x3 stem. `shortcut`: "B" (projection,
    default for the ImageNet family) or "A" (zero-padding identity, default for the CIFAR family).
    `residual=False` gives the plain twin with the same layers. `width` scales the base width
    (64 or 16) and doubles it per stage. `dtype` is the compute dtype; params stay float32.
    `kernels`: "xla" (plain Flax), "cpu" (resnet_jax.cpu's kernel set, same variables) or "auto"
    (the CPU set on a single CPU device, plain Flax elsewhere). `drop_path_rate` in [0, 1):
    stochastic depth at training, linear over the blocks (see `ResNet`); it adds no variables.
    """
    _check_choice("model name", name, MODEL_NAMES)
    if stem is not None:
        _check_choice("stem", stem, STEMS if name in IMAGENET_FAMILY else ("cifar",))
    if shortcut is not None:
        _check_choice("shortcut", shortcut, SHORTCUTS)
    if frozen_stages < -1:
        raise ValueError(f"frozen_stages must be -1 (none) or a stage index >= 0: {frozen_stages}.")
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1): {drop_path_rate}.")
    common: dict[str, Any] = dict(
        num_classes=num_classes, residual=residual, zero_init_residual=zero_init_residual,
        frozen_stages=frozen_stages, drop_path_rate=drop_path_rate, dtype=dtype,
        axis_name=axis_name, **kernel_modules(kernels),
    )  # fmt: skip
    if shortcut is not None:
        common["shortcut"] = shortcut
    if name in IMAGENET_FAMILY:
        block_cls, stage_sizes = IMAGENET_FAMILY[name]
        base = width or 64
        return ResNet(
            stage_sizes=stage_sizes, block_cls=block_cls, stem=stem or "imagenet",
            stem_width=base, stage_widths=tuple(base * 2**i for i in range(4)), **common,
        )  # fmt: skip
    base = width or 16
    return CifarResNet(
        stage_sizes=(CIFAR_FAMILY[name],) * 3, stem_width=base,
        stage_widths=tuple(base * 2**i for i in range(3)), **common,
    )  # fmt: skip


def num_stages(model: ResNet) -> int:
    """How many residual stages the model has (4 for the ImageNet family, 3 for the CIFAR one)."""
    return len(model.stage_sizes)


def stage_of(param_path: Sequence[str]) -> int | None:
    """The stage a parameter belongs to: 0 for the stem, i for `layer{i}_*`, None for the head."""
    top = param_path[0]
    if top in ("conv1", "bn1"):
        return 0
    if top.startswith("layer"):
        return int(top[len("layer") :].split("_")[0])
    return None


def count_params(params: Any) -> int:
    """Total number of parameters in a params tree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init_shapes(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """The variables' shapes and dtypes, without allocating or compiling (`jax.eval_shape`)."""
    dummy = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    init: Callable[..., Any] = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), dummy)
