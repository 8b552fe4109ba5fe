"""Boot the real guest image under TCG and check the guest contract from the inside."""
import contextlib
import json
import shutil

import pytest

pexpect = pytest.importorskip("pexpect")

from vmlab.image import ImageError, ensure_image, image_status  # noqa: E402
from vmlab.image.modules import module_name, plain_name  # noqa: E402
from vmlab.image.pattern import pattern_sha256  # noqa: E402

pytestmark = pytest.mark.integration
PROMPT = "@@P@@ "


class Guest:
    """Minimal serial driver for this test only (the product uses vmlab.qemu.console)."""

    def __init__(self, child) -> None:
        self.child = child

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        self.child.sendline(f'{cmd}; echo "@RC=$?@"')
        self.child.expect(r"@RC=(\d+)@", timeout=timeout)
        out, rc = self.child.before, int(self.child.match.group(1))
        self.child.expect_exact(PROMPT, timeout=timeout)
        return rc, out.replace("\r", "").strip("\n")


def json_lines(out: str) -> list[dict]:
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


@pytest.fixture(autouse=True)
def stock_kernel(monkeypatch):
    """These tests are about the distribution kernel's image (modules loaded by /init), so they
    keep off the suite's minimal kernel (tests/conftest.py sets VMLAB_KERNEL)."""
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)


@contextlib.contextmanager
def booted(tmp_path, extra_files=None, append="", qemu_extra=()):
    """Build the image, boot it under TCG, yield the console at VMLAB-READY; always kill qemu."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed")
    try:
        img = ensure_image(extra_files=extra_files)
    except ImageError as e:
        pytest.skip(f"no guest image: {e}")
    argv = ["-name", "helper-image-boot-test", "-accel", "tcg", "-m", "256", "-nographic",
            "-no-reboot", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", f"console=ttyS0 panic=-1 quiet {append}", *qemu_extra]
    log = open(tmp_path / "console.log", "w")
    child = pexpect.spawn("qemu-system-x86_64", argv, encoding="utf-8", codec_errors="replace",
                          timeout=120, logfile=log)
    try:
        yield child
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()
        log.close()


@pytest.fixture
def guest(tmp_path):
    """One booted guest per test (the repo conftest forbids qemu outliving a test)."""
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool-ran\n")
    tool.chmod(0o750)
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello over 9p\n")
    with booted(tmp_path, {"/usr/local/bin/tool.sh": tool},
                "vmlab.name=imgtest vmlab.share=1 vmlab.modules=vsock_loopback",
                ["-fsdev", f"local,id=fs0,path={share},security_model=none",
                 "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=vmlab"]) as child:
        child.expect(r"\nVMLAB-READY\r*\n")
        child.sendline("stty -echo; PS1='@@''P@@ '")
        child.expect_exact(PROMPT)
        yield Guest(child)


def test_guest_contract(guest):
    """Modules, hostname, 9p share, user files, info without a device, poweroff -f."""
    rc, out = guest.run("cat /proc/modules")
    names = {l.split()[0] for l in out.splitlines() if l.strip()}
    assert rc == 0
    assert {"vsock", "vmw_vsock_virtio_transport", "virtio_pci", "9pnet_virtio",
            "vsock_loopback"} <= names

    assert guest.run("hostname") == (0, "imgtest")
    assert guest.run("cat /mnt/host/hello.txt") == (0, "hello over 9p")

    rc, out = guest.run("stat -c '%a %s' /usr/local/bin/tool.sh && /usr/local/bin/tool.sh")
    assert (rc, out.splitlines()) == (0, ["750 24", "tool-ran"])  # size of tool.sh

    # Without the loopback transport and without a vsock device there is no CID.
    rc, out = guest.run("rmmod vsock_loopback; /bin/vmlab-guest info")
    (ev,) = json_lines(out)
    assert rc == 1 and ev["event"] == "error" and ev["op"] == "info" and ev["errno"] == 19

    guest.child.sendline("poweroff -f")
    guest.child.expect(pexpect.EOF, timeout=60)
    guest.child.close()
    assert guest.child.exitstatus == 0


def test_guest_helper_over_loopback(guest):
    """vmlab-guest end to end inside one guest via vsock_loopback (CID 1)."""
    rc, out = guest.run("vmlab-guest listen 5000 --once --expect-bytes 300000 >/tmp/l.out & "
                        "sleep 0.5; vmlab-guest connect local 5000 --send-bytes 300000; "
                        "wait; cat /tmp/l.out")
    assert rc == 0
    evs = {e["event"]: e for e in json_lines(out)}
    assert evs["sent"]["sha256"] == evs["received"]["sha256"] == pattern_sha256(300000)
    assert evs["received"]["bytes"] == 300000 and evs["accepted"]["peer_cid"] == 1

    rc, out = guest.run("vmlab-guest listen 5001 --once --seqpacket --echo >/tmp/s.out & "
                        "sleep 0.5; vmlab-guest connect 1 5001 --seqpacket --send-bytes 700 "
                        "--chunk 300 --shutdown --recv; wait")
    assert rc == 0
    msgs = [e for e in json_lines(out) if e["event"] == "message"]
    assert [m["len"] for m in msgs] == [300, 300, 100]  # echoed back one message at a time
    assert msgs[0]["data"].encode("latin-1")[:5] == bytes(range(5))

    rc, out = guest.run("vmlab-guest connect local 5999")
    (ev,) = json_lines(out)
    assert rc == 1 and ev["event"] == "error" and ev["op"] == "connect"


def test_module_failure_is_loud_and_boot_continues(tmp_path):
    """A broken module file (replaced through extra_files) is reported, READY still comes."""
    bad = tmp_path / "vsock.ko"
    bad.write_bytes(b"not an ELF module")
    status = image_status()
    vsock = [plain_name(m) for m in (status.get("modules") or {}).get("core", [])
             if module_name(m) == "vsock"]
    if not vsock:
        pytest.skip("vsock is built into this kernel (or no image): nothing to break")
    target = f"/lib/modules/{status['kernel_version']}/{vsock[0]}"
    with booted(tmp_path, {target: bad}) as child:
        child.expect(r"VMLAB-MODULE-FAIL vsock: [^\r\n]*")
        child.expect(r"VMLAB-MODULE-FAIL vmw_vsock_virtio_transport: ")  # needs vsock
        child.expect(r"VMLAB-MODULE-FAIL-COUNT \d+")
        child.expect(r"\nVMLAB-READY\r*\n")
        child.sendline("stty -echo; poweroff -f")
        child.expect(pexpect.EOF, timeout=60)
