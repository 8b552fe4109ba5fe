"""Kernel build pieces that need no compiler: config fragments, checks, references, store, logs."""
import subprocess
from pathlib import Path

import pytest

from vmlab.kernel import store
from vmlab.kernel.build import failing_lines
from vmlab.kernel.config import (ConfigError, Fragment, check_config, config_hash, merged_fragment,
                                 parse_config, required_options)
from vmlab.kernel.source import identify
from vmlab.kernel.spec import KernelRef, KernelRefError, parse_ref


def test_required_options_cover_what_the_guest_uses():
    req = set(required_options())
    for opt in ("CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_VSOCKETS_LOOPBACK", "CONFIG_VSOCKETS_DIAG",
                "CONFIG_9P_FS", "CONFIG_NET_9P_VIRTIO", "CONFIG_VIRTIO_FS", "CONFIG_VIRTIO_NET",
                "CONFIG_DEVTMPFS", "CONFIG_ACPI_BUTTON", "CONFIG_INPUT_EVDEV", "CONFIG_HOTPLUG_PCI_ACPI",
                "CONFIG_BLK_DEV_INITRD", "CONFIG_BINFMT_ELF", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_64BIT",
                "CONFIG_OVERLAY_FS", "CONFIG_PACKET"):
        assert opt in req
    # a guest with the host-side driver routes connects to CIDs > 2 to it: VM-to-VM would break
    assert "CONFIG_VHOST_VSOCK" not in req and "CONFIG_VSOCKMON" not in req
    from vmlab.kernel.spec import minimal_fragment
    host = parse_config(Path(minimal_fragment("vhost-host")).read_text())
    assert host["CONFIG_VHOST_VSOCK"] == "y" and host["CONFIG_VSOCKMON"] == "y"


def test_parse_config_reads_values_and_unset_lines_and_names_bad_lines():
    got = parse_config("CONFIG_A=y\n# CONFIG_B is not set\n# comment\n\nCONFIG_C=\"x\"\n")
    assert got == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    with pytest.raises(ConfigError, match=r"frag:2: not a Kconfig line: 'KASAN=y'"):
        parse_config("CONFIG_A=y\nKASAN=y\n", "frag")


def test_fragment_file_is_validated_when_loaded(tmp_path):
    bad = tmp_path / "f.config"
    bad.write_text("CONFIG_KASAN=y\nlockdep\n")
    with pytest.raises(ConfigError, match=r"f.config:2"):
        Fragment.load(bad)
    with pytest.raises(ConfigError, match="cannot read config fragment"):
        Fragment.load(tmp_path / "missing")


def _full(**overrides) -> str:
    opts = {name: "y" for name in required_options()}
    opts.update(overrides)
    return "".join(f"CONFIG_{k[7:]}={v}\n" if v != "n" else f"# {k} is not set\n" for k, v in opts.items())


def test_check_config_names_every_required_option_that_did_not_stick():
    assert check_config(_full(), Fragment("", "")) == []
    problems = check_config(_full(CONFIG_VSOCKETS_DIAG="n", CONFIG_VIRTIO_VSOCKETS="m"), Fragment("", ""))
    assert len(problems) == 2
    assert problems[0].startswith("CONFIG_VSOCKETS_DIAG=n") and "depends on" in problems[0]
    assert problems[1].startswith("CONFIG_VIRTIO_VSOCKETS=m: vmlab needs it built in")


def test_check_config_lets_the_fragment_turn_off_a_vmlab_option_and_reports_its_dropped_options():
    from vmlab.kernel.config import turned_off

    frag = Fragment("# CONFIG_VSOCKETS_LOOPBACK is not set\nCONFIG_KASAN=y\n", "debug.config")
    assert turned_off(frag) == {"CONFIG_VSOCKETS_LOOPBACK": "n"}
    problems = check_config(_full(CONFIG_VSOCKETS_LOOPBACK="n"), frag)
    assert not any("VSOCKETS_LOOPBACK" in p for p in problems)   # deliberately off: allowed
    assert any(p.startswith("CONFIG_KASAN: the fragment debug.config asks for y") for p in problems)
    # asked off, but something selects it back on: the fragment did not get what it asked for
    problems = check_config(_full(CONFIG_KASAN="y"), frag)
    assert problems == ["CONFIG_VSOCKETS_LOOPBACK: the fragment debug.config asks for n, the final "
                        ".config has y (a dependency is unmet or the value is invalid)"]
    assert check_config(_full(CONFIG_KASAN="y"), Fragment("CONFIG_KASAN=y\n", "d")) == []


def test_merged_fragment_puts_the_user_last_and_hash_ignores_comments():
    merged = merged_fragment(Fragment("CONFIG_KASAN=y\n", "d.config"))
    assert merged.index("CONFIG_VSOCKETS_DIAG=y") < merged.index("CONFIG_KASAN=y")
    assert config_hash("# x\nCONFIG_A=y\n") == config_hash("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert config_hash("CONFIG_A=y\n") != config_hash("CONFIG_A=m\n")


@pytest.mark.parametrize("value, ref", [
    ("build:fast", KernelRef("build", "fast")),
    ("package:linux-image-6.1.0-57-amd64", KernelRef("package", "linux-image-6.1.0-57-amd64")),
    ("source:../linux", KernelRef("source", "/linux")),
    ("vmlinuz", KernelRef("path", "/s/vmlinuz")),
    ("/boot/vmlinuz", KernelRef("path", "/boot/vmlinuz")),
    ({"source": "../linux", "config": "kasan.config"}, KernelRef("source", "/linux", "/s/kasan.config")),
    ({"package": "linux-image-6.1.0-57-amd64"}, KernelRef("package", "linux-image-6.1.0-57-amd64")),
    ({"build": "x"}, KernelRef("build", "x")),
    ("minimal", KernelRef("minimal", "minimal")),
    ("./minimal", KernelRef("path", "/s/minimal")),
    ("minimal:my.config", KernelRef("minimal", "minimal", "/s/my.config")),
])
def test_kernel_references_parse(value, ref):
    assert parse_ref(value, Path("/s")) == ref


@pytest.mark.parametrize("value, message", [
    ("", "empty"), ("build:", "names no build"), ({"source": "a", "package": "b"}, "exactly one of"),
    ({"package": "x", "config": "c"}, "config is only for source"), ({"sauce": "x"}, "exactly one of"),
    (3, "not int"), ({"source": 3}, "non-empty string"),
    ("minimal:", "names no variant"), ("minimal:nosuch", "no such variant .*vhost-host"),
])
def test_bad_kernel_references_say_what_is_wrong(value, message):
    with pytest.raises(KernelRefError, match=message):
        parse_ref(value)


def test_failing_lines_pick_the_errors_with_context():
    log = "  CC a.o\n  CC b.o\nb.c: In function 'f':\nb.c:3:1: error: expected ';'\nmake[2]: *** [b.o] Error 1\n  CC c.o\n"
    lines = failing_lines(log)
    assert lines == ["b.c: In function 'f':", "b.c:3:1: error: expected ';'", "make[2]: *** [b.o] Error 1"]
    assert failing_lines("one\ntwo\n") == ["one", "two"]


def test_store_finds_builds_by_name_and_key_prefix(tmp_path):
    for key, name in (("aaaa1111", "one"), ("aaaa2222", "two"), ("bbbb3333", "one")):
        d = store.builds_dir(tmp_path) / key
        d.mkdir(parents=True)
        (d / "bzImage").write_bytes(b"k")
        store.save(d, store.BuildMeta(key=key, name=name, version="6.1", kernel="bzImage", source="/src",
                                      source_kind="git", source_identity="git:x", commit="c" * 40,
                                      config_hash="f" * 64, built=float(len(list(tmp_path.rglob("*"))))))
    assert store.find("two", tmp_path).meta.key == "aaaa2222"
    assert store.find("one", tmp_path).meta.key == "bbbb3333"        # newest of that name
    assert store.find("bbbb", tmp_path).meta.name == "one"
    with pytest.raises(store.StoreError, match="ambiguous"):
        store.find("aaaa", tmp_path)
    with pytest.raises(store.StoreError, match="builds: one, two, one"):
        store.find("nope", tmp_path)
    desc = store.find("two", tmp_path).meta.describe()
    assert desc == "6.1 build:two commit cccccccccccc config ffffffffffff"


def test_git_source_identity_follows_commit_diff_and_untracked_files(tmp_path):
    src = tmp_path / "linux"
    (src / "arch/x86").mkdir(parents=True)
    for f in ("Makefile", "Kconfig", "arch/x86/Kconfig"):
        (src / f).write_text("x\n")
    git = lambda *a: subprocess.run(["git", "-C", str(src), *a], check=True, capture_output=True)
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "0")
    git("add", "-A")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "1")
    clean = identify(src)
    assert clean.kind == "git" and not clean.dirty and clean.identity == f"git:{clean.commit}"
    (src / "Makefile").write_text("patched\n")
    patched = identify(src)
    assert patched.dirty and patched.commit == clean.commit and patched.identity != clean.identity
    (src / "new.c").write_text("int x;\n")
    assert identify(src).identity != patched.identity


def test_non_git_tree_identity_changes_when_a_file_does(tmp_path):
    src = tmp_path / "linux"
    (src / "arch/x86").mkdir(parents=True)
    for f in ("Makefile", "Kconfig", "arch/x86/Kconfig"):
        (src / f).write_text("x\n")
    first = identify(src)
    assert first.kind == "tree"
    (src / "Kconfig").write_text("changed\n")
    assert identify(src).identity != first.identity
    with pytest.raises(Exception, match="not a Linux source tree"):
        identify(tmp_path)


def test_scenario_kernel_accepts_references_and_names_bad_ones(tmp_path):
    from vmlab.scenario import ScenarioError, load_scenario

    (tmp_path / "linux").mkdir()
    (tmp_path / "vmlinuz").write_bytes(b"x")
    good = tmp_path / "good.yaml"
    good.write_text("vms:\n  - {name: a, cid: 3, kernel: vmlinuz}\n"
                    "  - {name: b, cid: 4, kernel: {source: linux}}\n"
                    "  - {name: c, cid: 5, kernel: 'package:linux-image-6.1.0-57-amd64'}\n"
                    "  - {name: d, cid: 6, kernel: minimal}\n")
    vms = load_scenario(good).vms
    assert vms[0].kernel == tmp_path / "vmlinuz"
    assert vms[1].kernel == KernelRef("source", str(tmp_path / "linux"))
    assert vms[2].kernel == KernelRef("package", "linux-image-6.1.0-57-amd64")
    assert vms[3].kernel == KernelRef("minimal", "minimal") and str(vms[3].kernel) == "minimal"
    from vmlab.kernel.spec import minimal_fragment
    host = parse_ref("minimal:vhost-host")
    assert host.config == minimal_fragment("vhost-host") and str(host) == "minimal:vhost-host"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vms:\n  - {name: a, cid: 3, kernel: {source: nope}}\n"
                   "  - {name: b, cid: 4, kernel: 'build:no-such-build-here'}\n"
                   "  - {name: c, cid: 5, kernel: {package: vim, config: x}}\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(bad)
    text = str(err.value)
    assert f"bad.yaml:2:" in text and f"source {tmp_path / 'nope'} is not a directory" in text
    assert "bad.yaml:3:" in text and "no kernel build named 'no-such-build-here'" in text
    assert "bad.yaml:4:" in text and "config is only for source" in text
