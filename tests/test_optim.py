"""Schedules against their formulas, optimizers against torch.optim (LARS and LAMB against their
definitions), decay masks, freezing."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from resnet_jax import optim

torch.set_num_threads(1)

BASE_LR = 0.4
TOTAL = 200
STEPS = [0, 1, 7, 10, 19, 20, 21, 29, 30, 31, 50, 99, 100, 101, 119, 120, 149, 150, 151, 159, 160]
STEPS += [161, 199, 200, 250]


def _decays(t, boundaries, factor):
    return BASE_LR * factor ** sum(t >= b for b in boundaries)


# name, options, lr(u, t, decay_steps): u counts from the end of warmup, t is the absolute step.
SCHEDULES = [
    ("constant", {}, lambda u, t, d: BASE_LR),
    ("cosine", {}, lambda u, t, d: BASE_LR * 0.5 * (1 + math.cos(math.pi * min(u, d) / d))),
    (
        "cosine",
        {"final_lr": 0.04},
        lambda u, t, d: 0.04 + (BASE_LR - 0.04) * 0.5 * (1 + math.cos(math.pi * min(u, d) / d)),
    ),
    # The step boundaries are absolute steps, warmup or not; by default 50% and 75% of the run.
    ("step", {}, lambda u, t, d: _decays(t, (100, 150), 0.1)),
    (
        "step",
        {"boundaries": (30, 120, 160), "decay_factor": 0.5},
        lambda u, t, d: _decays(t, (30, 120, 160), 0.5),
    ),
    ("exponential", {}, lambda u, t, d: BASE_LR * 0.1 ** (u / d)),
    (
        "exponential",
        {"decay_rate": 0.5, "decay_steps": 40},
        lambda u, t, d: BASE_LR * 0.5 ** (u / 40),
    ),
    ("time_based", {}, lambda u, t, d: BASE_LR / (1 + 1e-3 * u)),
    ("time_based", {"decay": 0.05}, lambda u, t, d: BASE_LR / (1 + 0.05 * u)),
]
SCHEDULE_IDS = [f"{name}-{'-'.join(map(str, opts)) or 'defaults'}" for name, opts, _ in SCHEDULES]


def expected_lr(formula, t, warmup):
    if t < warmup:
        return BASE_LR * t / warmup  # linear warmup from 0
    return formula(t - warmup, t, TOTAL - warmup)


@pytest.mark.parametrize("warmup", [0, 20])
@pytest.mark.parametrize(("name", "options", "formula"), SCHEDULES, ids=SCHEDULE_IDS)
def test_schedule_matches_formula(name, options, formula, warmup):
    schedule = optim.make_schedule(name, BASE_LR, TOTAL, warmup_steps=warmup, **options)
    expected = np.array([expected_lr(formula, t, warmup) for t in STEPS])
    # As optax calls it: an int32 step count, inside a compiled update.
    values = jax.jit(jax.vmap(schedule))(jnp.array(STEPS, jnp.int32))
    np.testing.assert_allclose(values, expected, rtol=2e-6, atol=1e-7)
    # And from Python ints, eagerly.
    for t in (0, 20, 100, 199):
        assert float(schedule(t)) == pytest.approx(
            expected_lr(formula, t, warmup), rel=2e-6, abs=1e-7
        )


@pytest.mark.parametrize("name", optim.SCHEDULE_NAMES)
def test_warmup_rises_linearly_from_zero_to_base(name):
    warmup = 40
    schedule = optim.make_schedule(name, BASE_LR, TOTAL, warmup_steps=warmup)
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup // 4)) == pytest.approx(BASE_LR / 4, rel=1e-6)
    assert float(schedule(warmup // 2)) == pytest.approx(BASE_LR / 2, rel=1e-6)
    assert float(schedule(warmup)) == pytest.approx(BASE_LR, rel=1e-6)


def test_step_boundary_inside_warmup_applies_from_the_end_of_warmup():
    schedule = optim.make_schedule(
        "step", 1.0, 100, warmup_steps=10, boundaries=(5, 50), decay_factor=0.5
    )
    assert float(schedule(5)) == pytest.approx(0.5)  # still warming up: 5/10 of the base
    assert float(schedule(10)) == pytest.approx(0.5)  # past step 5: decayed once
    assert float(schedule(49)) == pytest.approx(0.5)
    assert float(schedule(50)) == pytest.approx(0.25)


def test_step_schedule_decays_once_per_boundary_even_when_boundaries_coincide():
    repeated = optim.make_schedule("step", 1.0, 100, boundaries=(40, 40), decay_factor=0.5)
    assert float(repeated(39)) == 1.0
    assert float(repeated(40)) == pytest.approx(0.25)
    # Two steps in all: the default boundaries 50% and 75% are both step 1.
    short = optim.make_schedule("step", 1.0, 2)
    assert float(short(0)) == 1.0
    assert float(short(1)) == pytest.approx(0.01)


def test_schedule_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid choices") as info:
        optim.make_schedule("linear", 0.1, 100)
    for name in optim.SCHEDULE_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="decay_rate") as info:
        optim.make_schedule("cosine", 0.1, 100, decay_rate=0.5)
    assert "final_lr" in str(info.value)
    with pytest.raises(ValueError, match="boundaries") as info:
        optim.make_schedule("step", 0.1, 100, boundary=(50,))
    assert "decay_factor" in str(info.value)
    with pytest.raises(ValueError, match="none"):
        optim.make_schedule("constant", 0.1, 100, final_lr=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule("cosine", 0.1, 100, warmup_steps=100)
    with pytest.raises(ValueError, match="base_lr"):
        optim.make_schedule("cosine", -0.1, 100)


# ---------------------------------------------------------------------------------------------
# Optimizers against torch.optim on a small least-squares problem.

_data_rng = np.random.default_rng(0)
X = _data_rng.normal(size=(8, 3)).astype(np.float32)
Y = _data_rng.normal(size=(8, 2)).astype(np.float32)
INIT = {
    "kernel": _data_rng.normal(size=(3, 2)).astype(np.float32),
    "bias": _data_rng.normal(size=(2,)).astype(np.float32),
}


def _loss(params):
    return jnp.mean((X @ params["kernel"] + params["bias"] - Y) ** 2)


def run_optax(tx, params, steps, loss=_loss):
    """The params after each of `steps` updates."""
    grad = jax.jit(jax.grad(loss))
    update = jax.jit(tx.update)
    state = tx.init(params)
    trajectory = []
    for _ in range(steps):
        updates, state = update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def run_torch(make_torch_opt, params, steps, clip_norm=0.0, lr_at=None):
    """The same problem with torch tensors; `lr_at(t)` sets the rate of step t (0-based)."""
    tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    opt = make_torch_opt(list(tensors.values()))
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    trajectory = []
    for t in range(steps):
        opt.zero_grad()
        prediction = x @ tensors["kernel"]
        if "bias" in tensors:
            prediction = prediction + tensors["bias"]
        torch.mean((prediction - y) ** 2).backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip_norm)
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        opt.step()
        trajectory.append({k: v.detach().numpy().copy() for k, v in tensors.items()})
    return trajectory


WD = 0.05
OPTIMIZER_CASES = [
    # name, make_optimizer kwargs, torch optimizer
    ("sgd", {"learning_rate": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
    (
        "sgd",
        {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": WD},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=WD),
    ),
    (
        "sgd",
        {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": WD},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=WD),
    ),
    (
        "adam",
        {"learning_rate": 0.01, "weight_decay": WD},  # coupled L2, as torch's Adam
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=WD),
    ),
    (
        "adam",
        {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "eps": 1e-3},
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-3),
    ),
    (
        "adamw",
        {"learning_rate": 0.01, "weight_decay": 0.1},  # decoupled
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
    (
        "rmsprop",
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-3, "weight_decay": WD},
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, weight_decay=WD),
    ),
    (
        "rmsprop",
        {"learning_rate": 0.01, "decay": 0.8, "eps": 1e-3, "momentum": 0.5, "centered": True},
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.8, eps=1e-3, momentum=0.5, centered=True),
    ),
    (
        "rmsprop",
        {"learning_rate": 0.01, "decay": 0.95, "momentum": 0.9, "weight_decay": WD},
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.95, momentum=0.9, weight_decay=WD),
    ),
]


def _case_id(case):
    name, kwargs, _ = case
    return "-".join([name, *(k for k in kwargs if k != "learning_rate")])


@pytest.mark.parametrize(
    ("name", "kwargs", "torch_opt"), OPTIMIZER_CASES, ids=map(_case_id, OPTIMIZER_CASES)
)
def test_optimizer_matches_torch(name, kwargs, torch_opt):
    # torch decays every parameter it is given, so decay them all here too.
    tx = optim.make_optimizer(name, **kwargs, decay_all_params=True)
    ours = run_optax(tx, INIT, steps=8)
    reference = run_torch(torch_opt, INIT, steps=8)
    assert not np.allclose(ours[-1]["kernel"], INIT["kernel"])
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        try:
            chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
        except AssertionError as error:
            raise AssertionError(f"differs from torch after step {step + 1}") from error


@pytest.mark.parametrize(
    ("name", "kwargs", "torch_opt"),
    [case for case in OPTIMIZER_CASES if "weight_decay" in case[1]],
    ids=[_case_id(case) for case in OPTIMIZER_CASES if "weight_decay" in case[1]],
)
def test_optimizer_matches_torch_on_a_tree_of_kernels_with_the_default_mask(
    name, kwargs, torch_opt
):
    params = {"dense": {"kernel": INIT["kernel"]}}
    tx = optim.make_optimizer(name, **kwargs)  # kernels only: every leaf here
    ours = run_optax(
        tx, params, 5, loss=lambda p: _loss({"kernel": p["dense"]["kernel"], "bias": 0})
    )
    reference = run_torch(torch_opt, {"kernel": INIT["kernel"]}, 5)
    chex.assert_trees_all_close([p["dense"] for p in ours], reference, rtol=1e-5, atol=1e-6)


def test_sgd_with_schedule_uses_the_rate_of_each_step():
    schedule = optim.make_schedule("cosine", 0.1, 10, warmup_steps=3)
    tx = optim.make_optimizer("sgd", schedule, momentum=0.9, weight_decay=WD, decay_all_params=True)
    ours = run_optax(tx, INIT, 8)
    reference = run_torch(
        lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9, weight_decay=WD),
        INIT,
        8,
        lr_at=lambda t: float(schedule(t)),
    )
    chex.assert_trees_all_equal(ours[0], INIT)  # the first step's rate is 0
    chex.assert_trees_all_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_matches_torch():
    grad_norm = float(optax.tree.norm(jax.grad(_loss)(INIT)))
    assert grad_norm > 1.0  # so clipping at 0.5 is active, at least at first
    tx = optim.make_optimizer(
        "sgd", 0.05, momentum=0.9, weight_decay=WD, decay_all_params=True, grad_clip_norm=0.5
    )
    ours = run_optax(tx, INIT, 8)
    reference = run_torch(
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=WD), INIT, 8, clip_norm=0.5
    )
    chex.assert_trees_all_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_scales_by_the_global_norm():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5
    params = jax.tree.map(jnp.zeros_like, grads)
    for clip, scale in [(1.0, 1 / 5), (2.5, 1 / 2), (10.0, 1.0)]:
        tx = optim.make_optimizer("sgd", 1.0, grad_clip_norm=clip)
        updates, _ = tx.update(grads, tx.init(params), params)
        expected = {key: -scale * g for key, g in grads.items()}
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)


# LARS and LAMB (torch has neither): a few steps against their definitions written out in numpy, on
# a dense layer whose bias the default mask leaves undecayed and unadapted.
LAYER = {"dense": INIT}


def _layer_loss(params):
    return _loss(params["dense"])


def _norm(x):
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def lars_by_hand(params, steps, lr, wd, momentum, trust_coefficient, eps, nesterov=False):
    """You et al.'s LARS as optax.lars defines it: the kernel's step is lr * trust_coefficient *
    |w| / (|g + wd w| + eps) * (g + wd w); the bias (masked) takes a plain lr * g step; then
    momentum (torch-style trace) over the scaled steps."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in params.items()}
    trajectory = []
    for _ in range(steps):
        grads = jax.grad(_loss)(jax.tree.map(np.float32, params))
        for key in params:
            g = np.asarray(grads[key], np.float64)
            if key == "kernel":
                g = g + wd * params[key]
                g = g * trust_coefficient * _norm(params[key]) / (_norm(g) + eps)
            trace[key] = lr * g + momentum * trace[key]
            step = lr * g + momentum * trace[key] if nesterov else trace[key]
            params[key] = params[key] - step
        trajectory.append(dict(params))
    return trajectory


def lamb_by_hand(params, steps, lr, wd, b1, b2, eps):
    """LAMB (You et al. 2020): the Adam direction, plus wd * w, scaled by |w| / |that| for the
    kernel; the bias (masked) takes the plain Adam direction."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    trajectory = []
    for t in range(1, steps + 1):
        grads = jax.grad(_loss)(jax.tree.map(np.float32, params))
        for key in params:
            g = np.asarray(grads[key], np.float64)
            m[key] = b1 * m[key] + (1 - b1) * g
            v[key] = b2 * v[key] + (1 - b2) * g**2
            direction = (m[key] / (1 - b1**t)) / (np.sqrt(v[key] / (1 - b2**t)) + eps)
            if key == "kernel":
                direction = direction + wd * params[key]
                direction = direction * _norm(params[key]) / _norm(direction)
            params[key] = params[key] - lr * direction
        trajectory.append(dict(params))
    return trajectory


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_is_its_definition_with_bn_and_biases_masked(nesterov):
    tx = optim.make_optimizer(
        "lars", 2.0, weight_decay=WD, momentum=0.9, nesterov=nesterov, trust_coefficient=0.01,
        eps=1e-8,
    )  # fmt: skip
    ours = [p["dense"] for p in run_optax(tx, LAYER, 3, loss=_layer_loss)]
    reference = lars_by_hand(INIT, 3, 2.0, WD, 0.9, 0.01, 1e-8, nesterov=nesterov)
    chex.assert_trees_all_close(ours, jax.tree.map(np.float32, reference), rtol=1e-5, atol=1e-6)
    # The trust ratio matters: a plain SGD step of the same rate moves the kernel 50x further.
    assert not np.allclose(ours[0]["kernel"], INIT["kernel"], rtol=0, atol=1e-6)
    sgd = run_optax(optim.make_optimizer("sgd", 2.0, weight_decay=WD), LAYER, 1, loss=_layer_loss)
    lars_move = _norm(ours[0]["kernel"] - INIT["kernel"])
    assert _norm(sgd[0]["dense"]["kernel"] - INIT["kernel"]) > 10 * lars_move


def test_lamb_is_its_definition_with_bn_and_biases_masked():
    tx = optim.make_optimizer("lamb", 0.05, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-6)
    ours = [p["dense"] for p in run_optax(tx, LAYER, 3, loss=_layer_loss)]
    reference = lamb_by_hand(INIT, 3, 0.05, 0.1, 0.8, 0.99, 1e-6)
    chex.assert_trees_all_close(ours, jax.tree.map(np.float32, reference), rtol=1e-5, atol=1e-6)
    # Unmasked, it is optax.lamb itself, which adapts (and decays) every parameter.
    everything = optim.make_optimizer(
        "lamb", 0.05, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-6, decay_all_params=True
    )
    library = optax.lamb(0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
    chex.assert_trees_all_close(
        run_optax(everything, INIT, 3), run_optax(library, INIT, 3), rtol=1e-6
    )


NETWORK_PARAMS = {
    "conv1": {"kernel": np.full((3, 3, 1, 2), 2.0, np.float32)},
    "bn1": {"scale": np.ones(2, np.float32), "bias": np.ones(2, np.float32)},
    "layer1_0": {"conv1": {"kernel": np.ones((1, 1, 2, 2), np.float32)}},
    "fc": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3, np.float32)},
}


def test_kernels_only_marks_exactly_the_kernels():
    mask = optim.kernels_only(NETWORK_PARAMS)
    paths = {
        jax.tree_util.keystr(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert paths == {
        "['bn1']['bias']": False,
        "['bn1']['scale']": False,
        "['conv1']['kernel']": True,
        "['fc']['bias']": False,
        "['fc']['kernel']": True,
        "['layer1_0']['conv1']['kernel']": True,
    }


@pytest.mark.parametrize("name", optim.OPTIMIZER_NAMES)
@pytest.mark.parametrize("decay_all_params", [False, True])
def test_weight_decay_mask(name, decay_all_params):
    # Zero gradients: any update is weight decay.
    tx = optim.make_optimizer(name, 0.1, weight_decay=0.1, decay_all_params=decay_all_params)
    params = jax.tree.map(jnp.asarray, NETWORK_PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        is_kernel = path[-1].key == "kernel"
        if is_kernel or decay_all_params:
            assert np.all(np.asarray(update) < 0), jax.tree_util.keystr(path)
        else:
            assert np.all(np.asarray(update) == 0), jax.tree_util.keystr(path)
    if name in ("sgd", "adamw"):  # both subtract lr * wd * p from a zero-gradient step
        chex.assert_trees_all_close(
            updates["conv1"]["kernel"], -0.1 * 0.1 * params["conv1"]["kernel"], rtol=1e-6
        )


def test_optimizer_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid choices") as info:
        optim.make_optimizer("adagrad", 0.1)
    for name in optim.OPTIMIZER_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="momentum") as info:
        optim.make_optimizer("adam", 0.1, momentum=0.9)
    for option in ("b1", "b2", "eps"):
        assert option in str(info.value)
    with pytest.raises(ValueError, match="centred"):
        optim.make_optimizer("rmsprop", 0.1, centred=True)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer("sgd", 0.1, weight_decay=-1e-4)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        optim.make_optimizer("sgd", 0.1, grad_clip_norm=-1.0)


# ---------------------------------------------------------------------------------------------
# Freezing (the ResNet backbone case is in test_train_state.py, next to the train step).


def test_freeze_keeps_frozen_params_bit_identical_and_trains_the_rest_as_before():
    rng = np.random.default_rng(1)
    params = {
        "backbone": {
            "conv": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)},
            "bn": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
        },
        "head": {
            "kernel": rng.normal(size=(3, 2)).astype(np.float32),
            "bias": np.zeros(2, np.float32),
        },
    }

    def loss(p):
        hidden = jnp.tanh(X @ p["backbone"]["conv"]["kernel"])
        hidden = hidden * p["backbone"]["bn"]["scale"] + p["backbone"]["bn"]["bias"]
        return jnp.mean((hidden @ p["head"]["kernel"] + p["head"]["bias"] - Y) ** 2)

    def make_inner():
        return optim.make_optimizer(
            "sgd", 0.1, momentum=0.9, weight_decay=0.1, decay_all_params=True
        )

    tx = optim.freeze(make_inner(), lambda path: path[0] == "backbone")
    assert all(np.any(leaf != 0) for leaf in jax.tree.leaves(jax.grad(loss)(params)["backbone"]))
    trajectory = run_optax(tx, params, 5, loss=loss)
    for step_params in trajectory:
        chex.assert_trees_all_equal(step_params["backbone"], params["backbone"])
    # The head moves exactly as the wrapped optimizer alone would move it.
    head_only = run_optax(
        make_inner(), params["head"], 5, loss=lambda h: loss({**params, "head": h})
    )
    chex.assert_trees_all_close([p["head"] for p in trajectory], head_only, rtol=1e-5, atol=1e-7)
    assert not np.allclose(trajectory[-1]["head"]["kernel"], params["head"]["kernel"])
    # Frozen params carry no optimizer state (here: a momentum trace for the head only).
    state_size = sum(np.size(leaf) for leaf in jax.tree.leaves(tx.init(params)))
    assert state_size == sum(np.size(leaf) for leaf in jax.tree.leaves(params["head"]))
