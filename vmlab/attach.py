"""Reach into a lab kept by `vmlab run --keep`: `vmlab qmp`, `vmlab exec-guest`.

Each VM has a second QMP monitor for tools (`<vm>.qmp-tools`, the lab keeps the first), and its
serial console is released while the lab is kept, so these commands never fight the lab.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class AttachError(RuntimeError):
    """No such lab/VM, or it cannot be reached; the message says what to do."""


def find_vm(vm: str, lab_id: str | None) -> dict[str, Any]:
    """The state entry of VM `vm` in the one running lab that has it (or lab `lab_id`)."""
    from vmlab.runtime import running_labs

    labs = [lab for lab in running_labs() if vm in lab["vms"]
            and (lab_id is None or Path(lab["run_dir"]).name == lab_id)]
    if not labs:
        raise AttachError(f"no running lab has a VM {vm!r} (start one with `vmlab run SCENARIO "
                          "--keep`; `vmlab ls` lists them)")
    if len(labs) > 1:
        raise AttachError(f"several labs have a VM {vm!r}; pick one with --lab: "
                          + ", ".join(Path(lab["run_dir"]).name for lab in labs))
    entry = dict(labs[0]["vms"][vm])
    entry["run_dir"] = labs[0]["run_dir"]
    return entry


def qmp_command(path: str, command: str, arguments: dict | None = None,
                timeout: float = 30.0) -> Any:
    """One QMP command on a monitor socket: greeting, qmp_capabilities, command -> its return."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AttachError(f"cannot reach the QMP monitor {path}: {exc}") from None
    f = sock.makefile("rwb")

    def reply() -> dict:
        while True:
            line = f.readline()
            if not line:
                raise AttachError("QMP monitor closed the connection")
            msg = json.loads(line)
            if "event" not in msg:                 # events are not replies
                return msg
    try:
        reply()                                    # the greeting
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            req: dict[str, Any] = {"execute": cmd}
            if args:
                req["arguments"] = args
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            msg = reply()
            if "error" in msg:
                err = msg["error"]
                raise AttachError(f"{cmd}: {err.get('class')}: {err.get('desc')}")
        return msg.get("return")
    finally:
        f.close()
        sock.close()


def exec_guest(serial: str, command: str, timeout: float) -> tuple[int, str]:
    """Run a shell command on a kept VM's serial console: (exit code, output)."""
    from vmlab.qemu.console import Console, ConsoleError

    console = Console(Path(serial), name="guest")
    try:
        console.connect(timeout=5)
        return console.run(command, timeout=timeout)
    except ConsoleError as exc:
        raise AttachError(f"{exc} (is `vmlab console` attached to it?)") from None
    finally:
        console.close()


def find_lab(lab_id: str | None) -> dict[str, Any]:
    """The running lab `lab_id`, or the only running lab."""
    from vmlab.runtime import running_labs

    labs = [lab for lab in running_labs()
            if lab_id is None or Path(lab["run_dir"]).name == lab_id]
    if not labs:
        raise AttachError(f"no running lab {lab_id or ''} (start one with `vmlab run SCENARIO --keep`; "
                          "`vmlab ls` lists them)".replace("lab  (", "lab ("))
    if len(labs) > 1:
        raise AttachError("several labs run; pick one with --lab: "
                          + ", ".join(Path(lab["run_dir"]).name for lab in labs))
    return labs[0]


def control_request(path: Path, request: dict, timeout: float = 10) -> dict:
    """One JSON request to a lab's backend control socket (vsock/control.py)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise AttachError(f"cannot reach the lab's vsock backend at {path}: {exc} (a lab on the "
                              "vhost transport has no backend: capture there with --pcap on "
                              "`vmlab run`, which uses vsockmon)") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise AttachError("the backend closed the control socket without a reply")
            buf += chunk
    return json.loads(buf)


def capture(lab: dict[str, Any], out_fd: int, write_to: Path | None = None) -> int:
    """Attach a capture to a kept lab's backend until Ctrl-C or the lab ends; returns packets'
    bytes copied (to `out_fd`) or 0 when the backend writes `write_to` itself."""
    import os
    import tempfile

    ctl = Path(lab["run_dir"]) / "backend.ctl"
    if write_to is not None:
        reply = control_request(ctl, {"cmd": "pcap", "path": str(write_to.resolve())})
        if not reply.get("ok"):
            raise AttachError(f"backend refused the capture: {reply.get('error')}")
        try:
            while Path(lab["run_dir"]).exists():
                import time
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        _stop(ctl, reply["id"])
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-capture-"))
    fifo = tmp / "capture.fifo"
    os.mkfifo(fifo, 0o600)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    copied = 0
    pid = None
    try:
        reply = control_request(ctl, {"cmd": "pcap", "path": str(fifo)})
        if not reply.get("ok"):
            raise AttachError(f"backend refused the capture: {reply.get('error')}")
        pid = reply["id"]
        os.set_blocking(rd, True)
        while True:
            data = os.read(rd, 1 << 16)
            if not data:                     # the backend closed it (the lab ended)
                break
            try:
                os.write(out_fd, data)
            except BrokenPipeError:          # our reader (wireshark) went away
                break
            copied += len(data)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(rd)                         # the backend's next write ends its side (EPIPE)
        if pid is not None:
            _stop(ctl, pid)
        fifo.unlink(missing_ok=True)
        tmp.rmdir()
    return copied


def _stop(ctl: Path, pid: int) -> None:
    try:
        control_request(ctl, {"cmd": "pcap", "id": pid}, timeout=3)
    except (AttachError, OSError, ValueError):
        pass                                 # the lab is gone: nothing to stop
