"""The package installed from its wheel trains from any directory, with a copied recipe.

The wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info),
installed non-editable into a directory of its own, and run from a directory outside the source
tree with PYTHONPATH naming only the install, so that its copy wins over the editable one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env
from tests.test_reliability import image_folder


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_trains_a_copied_recipe_from_another_directory(
    tmp_path: Path, cache_dir: Path
):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    no_bytecode = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "resnet_jax", source / "resnet_jax", ignore=no_bytecode)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(wheels)], source)
    (wheel,) = wheels.glob("resnet_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    sources = {p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("resnet_jax/**/*.cc")}
    assert sources and sources <= packaged  # the CPU kernels' C++ is compiled on first use
    assert "resnet_jax/base_config.py" in packaged
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp_path)

    user = tmp_path / "user"  # the user's own folder: no configs/, no source tree
    user.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "resnet20.py", user / "mycopy.py")
    images = image_folder(user / "images", {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    env = {**subprocess_env(), "PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import resnet_jax; print(resnet_jax.__file__)"], user, env)
    assert Path(where.strip()).is_relative_to(site)
    _run(
        [
            sys.executable, "-m", "resnet_jax.train", "--config=mycopy.py", "--workdir=run",
            f"--config.dataset.name=folder:{images}", "--config.model.width=4",
            "--config.batch_size=4", "--config.eval_batch_size=4", "--config.num_epochs=1",
            f"--config.compilation_cache_dir={cache_dir}",
        ],
        user,
        env,
    )  # fmt: skip
    results = json.loads((user / "run" / "results.json").read_text())
    assert results["model"] == "resnet20" and results["num_test_examples"] == 4
