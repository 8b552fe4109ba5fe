"""`vmlab kernel build` of the distribution's 6.1 source: it boots hello.yaml and is reused.

The build itself (minutes) is done once by scripts/install-deps and then comes from the cache;
the session fixture builds it if install-deps did not (VMLAB_SKIP_KERNEL_BUILD=1).
"""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def vmlab(*args, timeout=900, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vmlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def minimal_kernel():
    from vmlab.kernel import BuildRequest, build_kernel

    return build_kernel(BuildRequest())  # the distribution's linux-source, vmlab's minimal config


def test_minimal_kernel_has_no_modules_and_every_required_option(minimal_kernel):
    from vmlab.kernel.config import parse_config, required_options

    config = parse_config((minimal_kernel.path / "config").read_text())
    assert all(config.get(opt) == "y" for opt in required_options())
    assert config.get("CONFIG_MODULES", "n") == "n"
    assert minimal_kernel.meta.source_kind == "package" and minimal_kernel.meta.version.startswith("6.1")


def test_minimal_kernel_boots_hello_and_the_report_names_it(minimal_kernel, tmp_path):
    junit = tmp_path / "hello.xml"
    ref = f"build:{minimal_kernel.meta.name}"
    proc = vmlab("run", "scenarios/hello.yaml", "--kernel", ref, "--junit-xml", str(junit))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED: 3 passed" in proc.stdout
    described = minimal_kernel.meta.describe()
    assert f"kernel guest: {described}" in proc.stdout
    assert minimal_kernel.meta.config_hash[:12] in described
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert props == {"kernel.guest": described}


def test_second_build_is_reused_from_the_cache(minimal_kernel):
    proc = vmlab("kernel", "build")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"reused build:{minimal_kernel.meta.name} "), proc.stdout
    assert f"kernel: {minimal_kernel.kernel}" in proc.stdout
    listing = vmlab("kernel", "ls")
    assert f"build:{minimal_kernel.meta.name}" in listing.stdout


def test_a_fragment_option_that_kconfig_drops_is_refused(minimal_kernel, tmp_path):
    # KASAN depends on SLUB or SLAB; tinyconfig has SLOB, so Kconfig silently drops it
    frag = tmp_path / "kasan.config"
    frag.write_text("CONFIG_KASAN=y\n")
    proc = vmlab("kernel", "build", minimal_kernel.meta.source, "--config", str(frag))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"CONFIG_KASAN: the fragment {frag} asks for y, the final .config has n" in proc.stderr
    assert "full log:" in proc.stderr
