"""`pip install vmlab` works without the source checkout.

Builds a real wheel from a copy of the work tree, checks what is inside it (image recipe, pytest11
entry point, console script, every package), installs it into a fresh venv and uses it from a
directory outside the checkout: `vmlab --help`, `python -m vmlab validate`, the image recipe found
through vmlab.image.paths (and the guest helper compiled from it), and pytest auto-loading the
plugin. The venv sees the system site-packages for the dependencies (no network needed for them);
the checks make sure vmlab itself comes from the venv, not from the editable checkout.
Building the wheel uses pip's isolated build (setuptools from the configured index), or the
installed setuptools + wheel when no index is reachable.
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from vmlab.image import paths

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                ".pytest_cache", "artifacts", ".venv*", "*.whl")


def _run(argv: list, *, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout[-4000:]}"
    return r


def _clean_env(venv: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMLAB_IMAGES_DIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def _source_packages() -> set[str]:
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vmlab").rglob("__init__.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE, symlinks=True)
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
            "-w", tmp / "dist", "."]
    try:
        _run(argv, cwd=src, env=_clean_env(), timeout=300)
    except AssertionError:
        # no index reachable for the isolated build env: use the installed setuptools + wheel
        if importlib.util.find_spec("wheel") is None:
            raise
        _run(argv + ["--no-build-isolation"], cwd=src, env=_clean_env(), timeout=300)
    wheels = list((tmp / "dist").glob("vmlab-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.integration
def test_wheel_contents(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        # the recipe is the repository's images/ file, byte for byte
        assert z.read("vmlab/_images/init") == (ROOT / "images/init").read_bytes()
        assert (z.read("vmlab/_images/guest/vmlab-guest.c")
                == (ROOT / "images/guest/vmlab-guest.c").read_bytes())
        # the vmlab exec shim is compiled from its source on first use: the source ships
        assert (z.read("vmlab/shim/vsock_shim.c")
                == (ROOT / "vmlab/shim/vsock_shim.c").read_bytes())
        # ... and so is the backend's optional rx accelerator
        assert (z.read("vmlab/vsock/_accel.c")
                == (ROOT / "vmlab/vsock/_accel.c").read_bytes())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        eps = configparser.ConfigParser()
        eps.read_string(z.read(f"{dist_info}/entry_points.txt").decode())
    assert dict(eps["pytest11"]) == {"vmlab": "vmlab.pytest_plugin"}
    assert dict(eps["console_scripts"])["vmlab"] == "vmlab.cli:main"
    # every package and module of the source tree made it (pyproject lists packages explicitly)
    for pkg in _source_packages():
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, f"package {pkg} missing from the wheel"
    for py in (ROOT / "vmlab").rglob("*.py"):
        rel = py.relative_to(ROOT).as_posix()
        assert "__pycache__" in rel or rel in names, f"{rel} missing from the wheel"
    assert "vmlab/py.typed" in names
    assert not any(n.startswith(("images/", "tests/", "scenarios/")) for n in names), \
        "only the vmlab package belongs in the wheel"


@pytest.mark.integration
def test_wheel_installed_outside_checkout(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path, env=_clean_env())
    py = venv / "bin" / "python"
    env = _clean_env(venv)
    _run([py, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", wheel],
         cwd=tmp_path, env=env, timeout=180)
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert ROOT not in work.parents

    out = _run([venv / "bin" / "vmlab", "--help"], cwd=work, env=env).stdout
    assert "validate" in out and "run" in out

    shutil.copy(ROOT / "scenarios" / "hello.yaml", work / "hello.yaml")
    _run([py, "-m", "vmlab", "validate", "hello.yaml"], cwd=work, env=env)
    (work / "bad.yaml").write_text("name: bad\nvms:\n  - name: g\n    cid: 2\n")
    bad = subprocess.run([py, "-m", "vmlab", "validate", "bad.yaml"], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert bad.returncode != 0 and "bad.yaml" in bad.stdout, bad.stdout

    probe = textwrap.dedent("""
        import json, sys, importlib.metadata as md
        import vmlab
        from vmlab.image.paths import images_dir, recipe_files
        from vmlab.image.helper import build_guest_helper, helper_source
        from vmlab.image.build import _init_script
        files = recipe_files()
        assert all(p.is_file() for p in files.values()), files
        dist = md.distribution("vmlab")
        helper = build_guest_helper(cache=__import__("pathlib").Path(sys.argv[1]))
        print(json.dumps({
            "vmlab": vmlab.__file__, "images_dir": str(images_dir()),
            "files": {k: str(v) for k, v in files.items()},
            "init": str(_init_script()), "helper_source": str(helper_source()),
            "dist": str(dist.locate_file("")),
            "pytest11": [e.value for e in dist.entry_points if e.group == "pytest11"],
            "helper": str(helper), "helper_size": helper.stat().st_size,
        }))
    """)
    info = json.loads(_run([py, "-c", probe, tmp_path / "cache"], cwd=work, env=env).stdout
                      .strip().splitlines()[-1])
    site = venv.resolve()
    for key in ("vmlab", "images_dir", "init", "helper_source", "dist"):
        assert Path(info[key]).resolve().is_relative_to(site), f"{key} not from the wheel: {info}"
    assert Path(info["images_dir"]).parts[-2:] == ("vmlab", "_images")
    assert (Path(info["files"]["guest/vmlab-guest.c"]).read_bytes()
            == (ROOT / "images/guest/vmlab-guest.c").read_bytes())
    assert info["pytest11"] == ["vmlab.pytest_plugin"]
    assert info["helper_size"] > 0

    # $VMLAB_IMAGES_DIR still wins over the packaged recipe
    alt = tmp_path / "alt-images"
    shutil.copytree(Path(info["images_dir"]), alt)
    got = _run([py, "-c", "from vmlab.image.paths import images_dir; print(images_dir())"],
               cwd=work, env={**env, "VMLAB_IMAGES_DIR": str(alt)}).stdout.strip()
    assert Path(got) == alt

    # pytest in the venv auto-loads the plugin from the installed wheel (pytest11 entry point)
    out = _run([py, "-m", "pytest", "-p", "no:cacheprovider", "--help"], cwd=work, env=env).stdout
    assert "--vmlab-transport" in out
    trace = subprocess.run([py, "-m", "pytest", "-p", "no:cacheprovider", "--trace-config",
                            "--collect-only", "-q"], cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120).stdout
    plugin_lines = [ln for ln in trace.splitlines() if "vmlab" in ln and "pytest_plugin.py" in ln]
    assert plugin_lines and all(str(site) in ln for ln in plugin_lines), trace[-3000:]


def test_images_dir_env_override(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VMLAB_IMAGES_DIR", str(tmp_path))
    assert paths.images_dir() == tmp_path
    assert paths.init_script() == tmp_path / "init"
    assert paths.helper_source() == tmp_path / "guest" / "vmlab-guest.c"


def test_images_dir_in_checkout(monkeypatch):
    """Editable install / plain checkout: the repository's images/ is the recipe."""
    monkeypatch.delenv("VMLAB_IMAGES_DIR", raising=False)
    files = paths.recipe_files()
    assert set(files) == {"init", "guest/vmlab-guest.c"}
    for name, path in files.items():
        assert path.is_file(), name
        assert path.read_bytes() == (ROOT / "images" / name).read_bytes()
