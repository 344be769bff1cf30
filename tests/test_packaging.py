"""A wheel built from the checkout installs fastppo.kernels and no top-level `kernels`.

`kernels` is Hugging Face's package name, which transformers probes for; shadowing it would
break transformers in every environment fastppo is installed into.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_fastppo_kernels_and_not_kernels(tmp_path):
    src = tmp_path / "src"
    # Build from a copy so the checkout gets no build/ or egg-info droppings.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks", "tests"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("fastppo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastppo/kernels/__init__.py" in names
    # Every package of the source tree must ship: a subpackage left out of pyproject's list
    # only shows up as an ImportError on an installed copy.
    source_packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fastppo").rglob("__init__.py")}
    for package in sorted(source_packages):
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    assert not any(n.startswith("kernels/") for n in names), [n for n in names if n.startswith("kernels/")]

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    assert not (site / "kernels").exists()

    probe = (
        "import importlib.util, fastppo.kernels, pathlib, sys\n"
        "site = pathlib.Path(sys.argv[1]).resolve()\n"
        "assert pathlib.Path(fastppo.kernels.__file__).resolve().is_relative_to(site), fastppo.kernels.__file__\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not pathlib.Path(spec.origin).resolve().is_relative_to(site), spec\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
    # The installed command line builds its parser (which imports every subcommand's module).
    cli = subprocess.run([sys.executable, "-m", "fastppo", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert cli.returncode == 0, cli.stderr
    for command in ("verify", "bench", "train"):
        assert command in cli.stdout


@pytest.mark.parametrize("how", ["python -m fastppo", "PYTHONPATH"])
def test_checkout_on_sys_path_leaves_hf_kernels_importable(how):
    """The checkout's root on sys.path (``python -m``/``-c`` run there, or PYTHONPATH, as torchrun
    workers and the bench fork server get it): its kernels/ folder must not stand in for Hugging
    Face's ``kernels`` package, which transformers (5.x requires it) imports when it loads a
    model, and ``fastppo.kernels`` must still be ours."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    if spec is None or "site-packages" not in (spec.origin or ""):
        pytest.skip("Hugging Face's kernels package is not installed here")
    code = "import runpy, sys\n"
    if how == "python -m fastppo":
        code += (
            "sys.argv = ['fastppo', '--help']\n"
            "try:\n    runpy.run_module('fastppo', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        )
    code += "import kernels, fastppo.kernels\nprint(kernels.__file__)\nprint(fastppo.kernels.__file__)\n"
    env = dict(os.environ)
    if how == "PYTHONPATH":
        env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours = out.stdout.strip().splitlines()[-2:]
    assert "site-packages" in hf, out.stdout
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def test_checkout_on_sys_path_without_hf_kernels_lets_transformers_probe():
    """Without Hugging Face's ``kernels`` package (transformers before 5.25 does not require it),
    a process started in the checkout (vLLM's model-inspection subprocess is one) finds our
    kernels/ folder under that name; transformers' probe then imports it and must learn "not
    installed", not die of an ImportError."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    if spec is not None and "site-packages" in (spec.origin or ""):
        pytest.skip("Hugging Face's kernels package is installed here")
    code = ("import sys\nsys.path.insert(0, '')\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import transformers.activations\nimport fastppo.kernels\n"
            "print(is_kernels_available(), 'gae' in fastppo.kernels.KERNEL_OPS)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout
