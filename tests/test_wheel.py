"""The package as a user gets it (issue 11): a wheel built from the checkout, installed in fresh venvs under
tmp_path, run from a folder outside the checkout.

- full install (the train extra from this machine's site-packages, the wheel itself with --no-deps):
  `edgekit demo` (train, export INT8 + sign, verify, the agent through a local broker) and `edgekit eval ipol`
  read only what the wheel ships, and write under EDGEKIT_STATE_DIR;
- agent-only install (a venv without system site-packages, the wheel with its base dependencies): the agent
  runs a bundle, and every command that needs an extra answers with one line naming it.

About a minute and a half: the wheel and the agent-only venv are built once per module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow]

# what a checkout holds that is not source (caches, local runs): not copied to the build
SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".benchmarks",
                              ".venv", "runs", "bundles", "demo", "keys", "out", "*.db", "*.db-*")


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """edgekit-*.whl built by pip from a copy of the checkout (the build writes build/ and *.egg-info beside the
    sources; the copy keeps them out of the working tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
    try:
        import setuptools

        if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1):  # bdist_wheel built in
            args.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    _ok(_run(args, dict(os.environ), tmp))
    (found,) = (tmp / "dist").glob("edgekit-*.whl")
    return found


def _venv(path: Path, wheel: Path, *, system_site: bool) -> dict[str, str]:
    """A venv at `path` with the wheel installed; the environment to run its `edgekit` in."""
    args = [sys.executable, "-m", "venv", str(path)] + (["--system-site-packages"] if system_site else [])
    _ok(_run(args, dict(os.environ), path.parent))
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if system_site:  # torch and the rest of the train extra come from this machine, edgekit from the wheel
        pip += ["--no-deps", "--ignore-installed"]
    _ok(_run([*pip, str(wheel)], dict(os.environ), path.parent, timeout=600))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["EDGEKIT_STATE_DIR"] = str(path.parent / "state")
    return env


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory, wheel) -> tuple[dict[str, str], Path]:
    root = tmp_path_factory.mktemp("agent-only")
    env = _venv(root / "venv", wheel, system_site=False)
    work = root / "work"
    work.mkdir()
    return env, work


def _where(env: dict[str, str], cwd: Path) -> str:
    return _ok(_run(["python", "-c", "import edgekit; print(edgekit.__file__)"], env, cwd)).strip()


@pytest.mark.data
@pytest.mark.torch
def test_full_install_runs_demo_and_eval_from_the_wheel(tmp_path, wheel, data_dir) -> None:
    pytest.importorskip("torch")
    env = _venv(tmp_path / "venv", wheel, system_site=True)
    work = tmp_path / "work"
    work.mkdir()
    assert _where(env, work).startswith(str(tmp_path / "venv")), "edgekit imported from outside the venv"

    demo = _ok(_run(["edgekit", "demo", "--epochs", "1"], env, work, timeout=600))
    state = tmp_path / "state"
    assert "$ edgekit run --bundle" in demo and (state / "demo" / "bundles" / "skab" / "manifest.sig").is_file()
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        assert "received" in demo and "review" in demo, demo[-2000:]

    table = _ok(_run(["edgekit", "eval", "ipol"], env, work))
    assert "held-out subjects 6-15" in table and (state / "eval" / "ipol.png").stat().st_size > 0
    assert not list(work.iterdir()), "a command wrote into the current directory"


def test_agent_only_install_answers_with_the_extra(agent_venv) -> None:
    env, work = agent_venv
    assert _run(["python", "-c", "import torch"], env, work).returncode != 0, "torch reached the agent venv"
    for args, extra in ((["train", "skab", "--out", "run"], "train"), (["export", "run", "--out", "b"], "train"),
                        (["eval", "ipol"], "train"), (["hub"], "hub"), (["labels", "export", "--out", "l.csv"], "hub")):
        proc = _run(["edgekit", *args], env, work)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and not proc.stdout, (args, proc.stdout, proc.stderr)
        assert f"edgekit {args[0]} needs the '{extra}' extra: pip install 'edgekit[{extra}]'" in lines[0], lines


@pytest.mark.data
@pytest.mark.torch
def test_agent_only_install_runs_the_agent(agent_venv, skab_bundle, data_dir) -> None:
    env, work = agent_venv
    assert _where(env, work).startswith(str(work.parent / "venv"))
    replay = data_dir / "skab" / "data" / "valve1" / "1.csv"
    out = _ok(_run(["edgekit", "run", "--bundle", str(skab_bundle), "--source", f"replay:{replay}", "--speed", "0",
                    "--broker", "", "--allow-unsigned"], env, work))
    assert "windows=" in out and "queued=" in out, out
    assert (work.parent / "state" / "outbox.db").is_file(), "the outbox did not default to EDGEKIT_STATE_DIR"
    shown = _ok(_run(["edgekit", "inspect", str(skab_bundle)], env, work))
    assert "Accelerometer1RMS" in shown and "every sha256 matches" in shown, shown
    assert not list(work.iterdir()), "the agent wrote into the current directory"
