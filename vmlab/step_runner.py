"""Execute scenario steps against a running lab.

Every vsock endpoint a step opens (host or guest, listener or connector) becomes an `Endpoint` that
records what happened as events in one vocabulary, the JSON lines the guest helper prints
(listening, accepted, connected, message, sent, received, closed, error). `expect` and `wait_for`
steps then check those events, whichever side and transport produced them.
"""

from __future__ import annotations

import errno
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmlab.endpoints import Endpoint, errno_name
from vmlab.guest import GuestHelperError, GuestProcess, connect_argv, listen_argv
from vmlab.scenario import (
    VMADDR_PORT_ANY, ExpectStep, FaultStep, GuestConnectStep, GuestListenStep, HostConnectStep,
    HostListenStep, HostRunStep, QmpStep, RunStep, SleepStep, Step, WaitForStep,
)


class StepFailed(AssertionError):
    """A step's expectation did not hold; the message says what was expected and what happened."""


@dataclass
class StepResult:
    name: str
    action: str
    ok: bool
    seconds: float
    detail: str = ""
    location: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")


# -- the runner -------------------------------------------------------------------------------

class StepRunner:
    """Runs steps in order; stops at the first failure and marks the rest skipped."""

    def __init__(self, lab, reporter: Callable[[StepResult], None] | None = None) -> None:
        self.lab = lab
        self.reporter = reporter
        self.endpoints: dict[str, Endpoint] = {}
        self._seen_kernel_errors: dict[str, int] = {}
        self._wants_messages: set[str] = set()
        self._step_number = 0

    def run(self, steps: list[Step]) -> list[StepResult]:
        results: list[StepResult] = []
        # Guest endpoints only log each recv (costly for bulk transfers) when an expect needs the text.
        self._wants_messages = {s.params.id for s in steps if s.action == "expect"
                                and (s.params.message is not None or s.params.messages is not None)}
        deadline = time.monotonic() + float(getattr(self.lab.scenario, "timeout", 300) or 300)
        failed = False
        for self._step_number, step in enumerate(steps, 1):
            where = str(step.location) if step.location else ""
            if failed:
                result = StepResult(step.name, step.action, False, 0.0, "skipped after an earlier failure", where, skipped=True)
            elif time.monotonic() > deadline:
                failed = True
                result = StepResult(step.name, step.action, False, 0.0, "scenario timeout reached", where)
            else:
                result = self.run_one(step)
                failed = not result.ok
            results.append(result)
            if self.reporter:
                self.reporter(result)
        return results

    def run_one(self, step: Step) -> StepResult:
        where = str(step.location) if step.location else ""
        started = time.monotonic()
        try:
            detail = getattr(self, f"_do_{step.action}")(step, step.params) or ""
            self._check_kernels()
            ok = True
        except (StepFailed, AssertionError, GuestHelperError) as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken step is a failed step, with its reason
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return StepResult(step.name, step.action, ok, time.monotonic() - started, detail, where)

    def _check_kernels(self) -> None:
        for name, lines in self.lab.kernel_errors().items():
            if len(lines) > self._seen_kernel_errors.get(name, 0):
                new = lines[self._seen_kernel_errors.get(name, 0)]
                self._seen_kernel_errors[name] = len(lines)
                raise StepFailed(f"guest kernel error on {name}: {new}")

    def endpoint(self, id: str) -> Endpoint:
        try:
            return self.endpoints[id]
        except KeyError:
            raise StepFailed(f"no endpoint with id {id!r} (known: {', '.join(self.endpoints) or 'none'})") from None

    def _add(self, ep: Endpoint) -> Endpoint:
        if ep.id in self.endpoints:
            raise StepFailed(f"endpoint id {ep.id!r} is already in use")
        self.endpoints[ep.id] = ep
        return ep

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float, ep: Endpoint | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if ep is not None:
                ep.refresh()
            if cond():
                return
            if time.monotonic() > deadline:
                seen = f" (seen: {ep.summary()})" if ep is not None else ""
                raise StepFailed(f"timed out after {timeout:g}s waiting for {what}{seen}")
            remaining = max(0.0, deadline - time.monotonic())
            if ep is not None:
                ep.wait_change(min(0.25, remaining))
            else:
                time.sleep(min(0.25, remaining))

    # -- plain steps ---------------------------------------------------------------------
    def _do_sleep(self, step: Step, p: SleepStep) -> str:
        time.sleep(p.seconds)
        return ""

    def _do_run(self, step: Step, p: RunStep) -> str:
        vm = self.lab.vm(p.vm)
        if step.background:
            log = f"/tmp/vmlab-bg-{self._step_number}.log"
            vm.run(f"( {p.command}\n) >{log} 2>&1 &", step.timeout)
            return f"started in the background (output: {log} in the guest)"
        rc, out = vm.run(p.command, step.timeout)
        shown = out.strip()
        if p.expect_exit is not None and rc != p.expect_exit:
            raise StepFailed(f"`{p.command}` on {p.vm} exited {rc}, expected {p.expect_exit}; output:\n{shown}")
        if p.expect_output is not None and p.expect_output not in out:
            raise StepFailed(f"`{p.command}` on {p.vm}: output does not contain {p.expect_output!r}; output:\n{shown}")
        if p.expect_regex is not None and not re.search(p.expect_regex, out, re.M):
            raise StepFailed(f"`{p.command}` on {p.vm}: output does not match /{p.expect_regex}/; output:\n{shown}")
        return f"exit {rc}: {shown[:200]}"

    def _do_qmp(self, step: Step, p: QmpStep) -> str:
        vm = self.lab.vm(p.vm)
        cmd = p.command.replace("_", "-") if p.command == "query_status" else p.command
        if cmd == "device_del":
            device = vm.vsock_device_id if p.device in (None, "vsock") else p.device
            vm.qmp.device_del(device, timeout=step.timeout)
            detail = f"{device} deleted"
        elif cmd == "quit":
            vm.qmp.quit()
            detail = "quit"
        elif cmd == "query-status":
            detail = vm.qmp.status()
        else:
            getattr(vm.qmp, cmd)()
            detail = cmd
            if cmd == "system_reset":
                vm.wait_ready(max(step.timeout, self.lab.options.boot_timeout))
                detail = "reset and booted again"
        if p.expect_status is not None:
            status = vm.qmp.status()
            if status != p.expect_status:
                raise StepFailed(f"{p.vm}: status is {status!r}, expected {p.expect_status!r}")
            detail += f"; status {status}"
        return detail

    def _do_fault(self, step: Step, p: FaultStep) -> str:
        if self.lab.backend is None:
            raise StepFailed("fault injection needs the vhost-user transport (our backend); this lab has none")
        req = {"cmd": "fault", "vm": p.vm, "kind": p.kind, "probability": p.probability,
               "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms, "direction": p.direction,
               "duration": p.duration, "op": p.op, "port": p.port, "after": p.after,
               "count": p.count, "window": p.window, "field": p.field, "stall_ms": p.stall_ms,
               # the rule's RNG stream is keyed by its step: same seed, same decisions
               "key": f"step{self._step_number}"}
        reply = self.lab.backend.control({k: v for k, v in req.items() if v is not None})
        if not reply.get("ok", False):
            raise StepFailed(f"backend refused the fault: {reply.get('error', reply)}")
        return f"{p.kind} on {p.vm}"

    def _do_wait_for(self, step: Step, p: WaitForStep) -> str:
        if p.console is not None:
            vm = self.lab.vm(p.vm)
            log_path = Path(vm.machine.config.console_log)
            rx = re.compile(p.console, re.M)
            self._wait(f"/{p.console}/ on {p.vm}'s console",
                       lambda: bool(rx.search(log_path.read_text(errors="replace"))) if log_path.exists() else False,
                       step.timeout)
            return "seen"
        ep = self.endpoint(p.id)
        self._wait(f"{p.event} on {p.id}", lambda: ep.has(p.event), step.timeout, ep)
        if isinstance(ep, HostRunEndpoint):
            return ep.check()
        return f"{p.id}: {p.event}"

    # -- host programs -------------------------------------------------------------------
    def _do_host_run(self, step: Step, p: HostRunStep) -> str:
        from vmlab.shim import LabTarget, ShimError, command_argv
        from vmlab.shim.process import HostProcess

        base = Path(self.lab.scenario.source).parent if self.lab.scenario.source else None
        cwd = Path(p.cwd) if p.cwd else base
        if cwd is not None and not cwd.is_absolute() and base is not None:
            cwd = base / cwd
        log = self.lab.run_dir / f"host-run-{self._step_number}.log"
        proc = HostProcess(command_argv(p.command), LabTarget.from_lab(self.lab), log,
                           env={"VMLAB_LAB_DIR": str(self.lab.run_dir),
                                **{k: str(v) for k, v in (p.env or {}).items()}},
                           cwd=str(cwd) if cwd is not None else None)
        try:
            proc.start()
        except (ShimError, OSError) as exc:
            raise StepFailed(f"host_run: {exc}") from None
        self.lab.track(proc)
        ep = HostRunEndpoint(p.id or f"host-run-{self._step_number}", proc, p)
        if step.background:
            if p.id:
                self._add(ep)
            try:
                if p.ready_port is not None:
                    proc.wait_listening(p.ready_port, step.timeout)
                if p.ready_output is not None:
                    proc.wait_for_output(p.ready_output, step.timeout)
            except (TimeoutError, RuntimeError) as exc:
                raise StepFailed(str(exc)) from None
            ready = (f"; listening on port {p.ready_port}" if p.ready_port is not None else "") + \
                    (f"; printed /{p.ready_output}/" if p.ready_output is not None else "")
            return f"started, pid {proc.pid}{ready}"
        try:
            proc.wait(step.timeout)
        except TimeoutError as exc:
            raise StepFailed(str(exc)) from None
        ep.refresh()
        return ep.check()

    # -- vsock endpoints -----------------------------------------------------------------
    def _do_guest_listen(self, step: Step, p: GuestListenStep) -> str:
        vm = self.lab.vm(p.vm)
        chunk = p.chunk or (65536 if p.id in self._wants_messages else None)
        ep = self._add(GuestProcess(p.id, "guest_listen", vm))
        ep.start(listen_argv(p.port, cid=p.cid, type=p.type, once=p.once, echo=p.echo, chunk=chunk,
                             expect_bytes=p.expect_bytes))
        ep.wait_for("listening", step.timeout)
        return f"listening on {p.vm} port {p.port if p.port != VMADDR_PORT_ANY else 'any'}"

    def _do_guest_connect(self, step: Step, p: GuestConnectStep) -> str:
        vm = self.lab.vm(p.vm)
        ep = self._add(GuestProcess(p.id, "guest_connect", vm))
        ep.start(connect_argv(self._resolve_cid(p.cid), p.port, type=p.type, send=p.send,
                              send_bytes=p.send_bytes, send_file=p.send_file, recv=p.recv,
                              recv_bytes=p.recv_bytes, timeout=step.timeout,
                              chunk=65536 if p.id in self._wants_messages else None))
        if step.background:
            return "started in the background"
        self._wait(f"{p.id} to finish", lambda: ep.finished, step.timeout, ep)
        return self._check_outcome(ep, p.expect_error)

    def _do_host_listen(self, step: Step, p: HostListenStep) -> str:
        from vmlab.vsock.host import host_listen

        vms = [self.lab.vm(p.vm)] if p.vm else [vm for vm in self.lab.vms if vm.transport]
        listener = self.lab.track(host_listen(p.port, vms=[vm.endpoint() for vm in vms], type=p.type, cid=p.cid,
                                              busy_timeout=step.timeout))
        ep = self._add(Endpoint(p.id, "host_listen", p.vm))
        ep.record({"event": "listening", "cid": p.cid, "port": listener.port})
        thread = threading.Thread(target=_serve, args=(listener, ep, p), name=f"host-listen-{p.id}", daemon=True)
        thread.start()
        return f"listening on host port {listener.port}"

    def _do_host_connect(self, step: Step, p: HostConnectStep) -> str:
        vm = self.lab.vm(p.vm)
        ep = self._add(Endpoint(p.id, "host_connect", p.vm))
        thread = threading.Thread(target=_connect, args=(self.lab, vm, ep, p, step.timeout),
                                  name=f"host-connect-{p.id}", daemon=True)
        thread.start()
        if step.background:
            return "started in the background"
        self._wait(f"{p.id} to finish", lambda: ep.finished, step.timeout, ep)
        return self._check_outcome(ep, p.expect_error)

    def _check_outcome(self, ep: Endpoint, expect_error: str | None) -> str:
        errors = ep.errors()
        if expect_error is not None:
            if expect_error not in errors:
                raise StepFailed(f"{ep.id}: expected error {expect_error}, got: {ep.summary()}")
            return f"failed as expected with {expect_error}"
        if errors:
            raise StepFailed(f"{ep.id}: {ep.summary()}")
        return ep.summary()

    def _resolve_cid(self, cid: int | str) -> int:
        if isinstance(cid, str):
            target = self.lab.vm(cid)
            if target.cid is None:
                raise StepFailed(f"VM {cid!r} has no vsock device")
            return target.cid
        return cid

    # -- expectations --------------------------------------------------------------------
    def _do_expect(self, step: Step, p: ExpectStep) -> str:
        ep = self.endpoint(p.id)
        timeout = p.timeout if p.timeout is not None else step.timeout
        checks: list[tuple[str, Callable[[], bool]]] = []
        if p.message is not None:
            checks.append((f"message {p.message!r}", lambda: ep.received_data() == p.message
                           or p.message in ep.messages()))
        if p.messages is not None:
            checks.append((f"messages {p.messages!r}", lambda: ep.messages() == list(p.messages)))
        if p.bytes is not None:
            checks.append((f"{p.bytes} bytes", lambda: ep.received_bytes() == p.bytes))
        if p.sha256 is not None:
            checks.append((f"sha256 {p.sha256}", lambda: self._sha_matches(ep, p)))
        if p.error is not None:
            checks.append((f"error {p.error}", lambda: p.error in ep.errors()))
        for what, cond in checks:
            try:
                self._wait(f"{p.id} to see {what}", cond, timeout, ep)
            except StepFailed:
                if ep.finished or ep.has("received"):
                    raise StepFailed(f"{p.id}: expected {what}, got: {ep.summary()}") from None
                raise
        got = ep.received_data()
        count = ep.received_bytes() if ep.received_bytes() is not None else len(got)
        shown = f": {got[:80]!r}" if got and got[:80].isprintable() else ""
        return f"{p.id} received {count} bytes{shown}"

    def _sha_matches(self, ep: Endpoint, p: ExpectStep) -> bool:
        got = ep.sha256()
        if got is None:
            return False
        if p.sha256 == "pattern":
            from vmlab.image.pattern import pattern_sha256
            n = p.bytes if p.bytes is not None else ep.received_bytes()
            return n is not None and got == pattern_sha256(n)
        return got.lower() == p.sha256.lower()


# -- host endpoint workers (threads) -------------------------------------------------------

def _oserror_event(op: str, exc: OSError) -> dict:
    num = exc.errno if exc.errno is not None else (errno.ECONNRESET if isinstance(exc, ConnectionResetError) else 0)
    return {"event": "error", "op": op, "errno": num, "errno_name": errno_name(num), "error": str(exc)}


def _pump(conn, ep: Endpoint, chunk: int, echo: bool, limit: int | None = None) -> None:
    """Read until EOF (or `limit` bytes), recording each recv as a message; echo if asked."""
    digest = hashlib.sha256()
    total = 0
    started = time.monotonic()
    buf = bytearray(max(1, chunk))
    view = memoryview(buf)
    while limit is None or total < limit:
        want = len(buf) if limit is None else min(len(buf), limit - total)
        n = conn.recv_into(view[:want])
        if n == 0:
            break
        data = view[:n]
        digest.update(data)
        total += n
        if total <= 1 << 20:  # keep message events for small exchanges, not for bulk transfers
            ep.record({"event": "message", "len": n, "data": bytes(data).decode("utf-8", "replace")})
        if echo:
            conn.sendall(data)
    seconds = max(time.monotonic() - started, 1e-9)
    ep.record({"event": "received", "bytes": total, "sha256": digest.hexdigest(),
               "seconds": round(seconds, 6), "mbps": round(total * 8 / seconds / 1e6, 3)})


def _serve(listener, ep: Endpoint, p: HostListenStep) -> None:
    """Accept `p.accept` connections, each served by its own thread (clients may overlap)."""
    chunk = p.chunk if p.type == "stream" else 65536
    workers = []

    def serve_one(conn) -> None:
        with conn:
            try:
                _pump(conn, ep, chunk, p.echo)
            except OSError as exc:
                ep.record(_oserror_event("recv", exc))
        ep.record({"event": "closed"})

    try:
        for _ in range(max(1, p.accept)):
            conn = listener.accept(timeout=None)
            ep.record({"event": "accepted", "peer_cid": getattr(conn, "peer_cid", None)})
            worker = threading.Thread(target=serve_one, args=(conn,), name=f"host-conn-{ep.id}", daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join()
    except OSError as exc:
        if not ep.finished:
            ep.record(_oserror_event("accept", exc))
    finally:
        ep.finish()


def _connect(lab, vm, ep: Endpoint, p: HostConnectStep, timeout: float) -> None:
    from vmlab.vsock.host import host_connect

    try:
        conn = lab.track(host_connect(vm.cid, p.port, endpoint=vm.endpoint(), type=p.type, timeout=timeout))
    except OSError as exc:
        ep.record(_oserror_event("connect", exc))
        ep.finish()
        return
    try:
        ep.record({"event": "connected", "cid": vm.cid, "port": p.port})
        messages: list[bytes] | None = None
        if p.send is not None:
            messages = [m.encode() for m in ([p.send] if isinstance(p.send, str) else p.send)]
        elif p.send_file is not None:
            messages = [Path(p.send_file).read_bytes()]
        if messages is not None:
            digest = hashlib.sha256()
            for message in messages:  # one sendall per message: one record on seqpacket
                conn.sendall(message)
                digest.update(message)
            ep.record({"event": "sent", "bytes": sum(map(len, messages)), "sha256": digest.hexdigest()})
        elif p.send_bytes is not None:
            from vmlab.image.pattern import pattern_bytes

            digest, sent, block = hashlib.sha256(), 0, 1 << 16
            while sent < p.send_bytes:
                data = pattern_bytes(sent, min(block, p.send_bytes - sent))
                conn.sendall(data)
                digest.update(data)
                sent += len(data)
            ep.record({"event": "sent", "bytes": sent, "sha256": digest.hexdigest()})
        if p.recv or p.recv_bytes is not None:
            if p.recv_bytes is None:
                conn.shutdown_write() if hasattr(conn, "shutdown_write") else None
            _pump(conn, ep, 65536, False, p.recv_bytes)
        ep.record({"event": "closed"})
    except OSError as exc:
        ep.record(_oserror_event("io", exc))
    finally:
        try:
            conn.close()
        except OSError:
            pass
        ep.finish()


class HostRunEndpoint(Endpoint):
    """A host_run program as an endpoint: one `exited` event; check() applies its expectations."""

    def __init__(self, id: str, proc, params: HostRunStep) -> None:
        super().__init__(id=id, kind="host_run", vm=None)
        self.proc = proc
        self.params = params

    def refresh(self) -> None:
        rc = self.proc.returncode
        if rc is not None and not self.finished:
            self.record({"event": "exited", "exit": rc})

    def wait_change(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.05))

    def check(self) -> str:
        p, rc = self.params, self.proc.returncode
        out = self.proc.output()
        shown = out.strip()[-2000:]
        cmd = p.command if isinstance(p.command, str) else " ".join(p.command)
        if p.expect_exit is not None and rc != p.expect_exit:
            raise StepFailed(f"host `{cmd}` exited {rc}, expected {p.expect_exit}; output:\n{shown}")
        if p.expect_output is not None and p.expect_output not in out:
            raise StepFailed(f"host `{cmd}`: output does not contain {p.expect_output!r}; output:\n{shown}")
        if p.expect_regex is not None and not re.search(p.expect_regex, out, re.M):
            raise StepFailed(f"host `{cmd}`: output does not match /{p.expect_regex}/; output:\n{shown}")
        return f"exit {rc}: {shown[:200]}"
