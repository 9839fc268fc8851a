"""Every script in examples/ runs, on the CPU with only torch and the package; and the package
installs from a wheel built from this checkout into an environment that already has torch, and
runs the examples from outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
TIMEOUT_S = 60   # each example runs in seconds on a CPU


# What the package may import that torch does not require: hidden from an example unless the
# wheel declares it, so that a dependency the package needs but does not declare fails here.
UNREQUIRED_BY_TORCH = ("numpy",)
HIDE = "import sys\nsys.modules.update(dict.fromkeys({names!r}))\n"   # None there: as if not installed


def _run(script, cwd, pythonpath, hidden=()):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = pythonpath
    if hidden:   # a sitecustomize first on the path hides them before anything imports
        (cwd / "hide").mkdir(exist_ok=True)
        (cwd / "hide" / "sitecustomize.py").write_text(HIDE.format(names=tuple(hidden)))
        env["PYTHONPATH"] = f"{cwd / 'hide'}{os.pathsep}{pythonpath}"
    return subprocess.run([sys.executable, script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_the_examples_are_the_documented_ones():
    assert EXAMPLES == ["batching.py", "fused_linear.py", "grpo_padded.py", "packed.py"]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The wheel built from a copy of the project's files (the checkout stays untouched),
    installed without dependencies into a folder of its own: (site folder, wheel file)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "mhpo_kernels"), src / "mhpo_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").iterdir()
    site = tmp / "site"
    install = subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return site, wheel


def test_wheel_holds_the_package_and_its_kernels(installed_wheel):
    site, wheel = installed_wheel
    assert wheel.name == "mhpo_kernels-0.1.0-py3-none-any.whl"
    for part in ("__init__.py", "kernels/forward.py", "kernels/prepare.py", "integrations/trl.py"):
        assert (site / "mhpo_kernels" / part).is_file(), part
    assert not (site / "reference").exists() and not (site / "tests").exists()


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_run_from_the_installed_wheel(installed_wheel, example, tmp_path):
    """Every example runs outside the checkout, with the wheel's folder first on the path: the
    package imported is the installed one, with only torch and what the wheel declares (anything
    else the package might reach for is hidden). (The same scripts, files and package as a
    checkout's run, which is therefore not run as well.)"""
    site, wheel = installed_wheel
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    declared = {line.split(":", 1)[1].strip().split(" ")[0].split(">")[0].split("=")[0].split(";")[0]
                for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    hidden = [m for m in UNREQUIRED_BY_TORCH if m not in declared]
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    (tmp_path / "where.py").write_text("import mhpo_kernels\nprint(mhpo_kernels.__file__)\n")
    where = _run("where.py", tmp_path, str(site))
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    run = _run(os.path.join("examples", example), tmp_path, str(site), hidden)
    assert run.returncode == 0, run.stderr[-3000:]
