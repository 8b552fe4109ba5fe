"""`python -m vmlab.vsock.backend --config FILE.json`: the vhost-user-vsock backend process.

One asyncio selector loop serves every VM of a lab: a ``VsockDevice`` per VM (vhost-user
socket, rings), the hybrid Unix-socket host side, the router between them, a JSON-lines
control socket, and an optional pcap capture. Prints ``READY`` once everything listens;
SIGTERM/SIGINT reset all connections, unlink every socket and exit 0.

Config (docs/architecture.md): {"vms": [{"name", "cid", "socket", "uds_path", "group"}],
"pcap": path|null, "log": path, optional "control": path (default: next to the log,
``backend.ctl``), "buf_alloc": bytes, "close_timeout": s, "log_level": "INFO", "host_ns":
str (lab-wide host listeners for the ``vmlab exec`` shim, see vmlab.vsock.hybrid), "seed": int
(the fault RNG seed, vsock/faults.py)}. Several captures may run at once (the config's, and
more added over the control socket, e.g. by `vmlab capture`); one whose reader went away is
closed without disturbing the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmlab.runtime import open_private
from vmlab.vsock.connection import CLOSE_TIMEOUT, DEFAULT_BUF_ALLOC
from vmlab.vsock.control import ControlServer
from vmlab.vsock.hybrid import Hybrid
from vmlab.vsock.pcap import PcapWriter
from vmlab.vsock.router import FaultInjector, Router

log = logging.getLogger("vmlab.vsock.backend")

MAX_VMS = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class ConfigError(ValueError):
    pass


@dataclass
class VmEntry:
    name: str
    cid: int
    socket: str
    uds_path: str
    group: str = "default"


@dataclass
class BackendConfig:
    vms: list[VmEntry]
    log: str | None = None
    pcap: str | None = None
    control: str | None = None
    buf_alloc: int = DEFAULT_BUF_ALLOC
    close_timeout: float = CLOSE_TIMEOUT
    log_level: str = "INFO"
    host_ns: str | None = None          # lab-wide host listeners (abstract Unix names), see hybrid
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_path(self) -> str:
        if self.control:
            return self.control
        base = Path(self.log).parent if self.log else Path(self.vms[0].socket).parent
        return str(base / "backend.ctl")


def parse_config(raw: Any) -> BackendConfig:
    """Validate a config dict; every problem is a ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    vms_raw = raw.get("vms")
    if not isinstance(vms_raw, list) or not vms_raw:
        raise ConfigError("vms: a non-empty list is required")
    if len(vms_raw) > MAX_VMS:
        raise ConfigError(f"vms: at most {MAX_VMS}")
    vms: list[VmEntry] = []
    seen_names: set[str] = set()
    seen_cids: set[int] = set()
    seen_paths: set[str] = set()
    for i, v in enumerate(vms_raw):
        where = f"vms[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: must be an object")
        for key in ("name", "cid", "socket", "uds_path"):
            if key not in v:
                raise ConfigError(f"{where}.{key}: required")
        name, cid = v["name"], v["cid"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: {name!r} is not a valid VM name")
        if not isinstance(cid, int) or isinstance(cid, bool) or not 3 <= cid < 0xFFFFFFFF:
            raise ConfigError(f"{where}.cid: {cid!r} must be an integer in 3..2^32-2")
        if name in seen_names:
            raise ConfigError(f"{where}.name: {name!r} used twice")
        if cid in seen_cids:
            raise ConfigError(f"{where}.cid: {cid} used twice")
        for key in ("socket", "uds_path"):
            p = v[key]
            if not isinstance(p, str) or not p or len(p.encode()) > 100:
                raise ConfigError(f"{where}.{key}: must be a path of at most 100 bytes "
                                  "(Unix socket limit, room left for _<port>)")
            if p in seen_paths:
                raise ConfigError(f"{where}.{key}: {p} used twice")
            if not Path(p).parent.is_dir():
                raise ConfigError(f"{where}.{key}: directory {Path(p).parent} does not exist")
            seen_paths.add(p)
        group = v.get("group") or "default"
        seen_names.add(name)
        seen_cids.add(cid)
        vms.append(VmEntry(name, cid, v["socket"], v["uds_path"], str(group)))
    cfg = BackendConfig(vms=vms, log=raw.get("log"), pcap=raw.get("pcap"),
                        control=raw.get("control"))
    if "buf_alloc" in raw:
        b = raw["buf_alloc"]
        if not isinstance(b, int) or not 4096 <= b <= 64 * 1024 * 1024:
            raise ConfigError("buf_alloc: an integer in 4096..64 MiB")
        cfg.buf_alloc = b
    if "close_timeout" in raw:
        cfg.close_timeout = float(raw["close_timeout"])
    if raw.get("host_ns") is not None:
        ns = raw["host_ns"]
        if not isinstance(ns, str) or not 1 <= len(ns.encode()) <= 80 or "\0" in ns:
            raise ConfigError("host_ns: a string of 1..80 bytes without NUL")
        cfg.host_ns = ns
    if "seed" in raw:
        seed = raw["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError("seed: a non-negative integer")
        cfg.seed = seed
    if "log_level" in raw:
        cfg.log_level = str(raw["log_level"]).upper()
    return cfg


def load_config(path: str | Path) -> BackendConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from e
    return parse_config(raw)


class Backend:
    """Everything one backend process serves; built by start(), undone by close()."""

    def __init__(self, cfg: BackendConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.router = Router(loop)
        self.hybrid = Hybrid(loop, self.router, buf_alloc=cfg.buf_alloc,
                             close_timeout=cfg.close_timeout, host_ns=cfg.host_ns)
        self.router.hybrid = self.hybrid
        self.devices: dict[str, Any] = {}
        self.control = ControlServer(loop, cfg.control_path, self.handle)
        self.pcaps: dict[int, PcapWriter] = {}
        self._pcap_ids = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self.router.faults.reseed(cfg.seed)

    def start(self) -> None:
        from vmlab.vsock.device import VsockDevice   # the heavy part, imported on use

        for vm in self.cfg.vms:
            dev = VsockDevice(vm.name, vm.cid, vm.socket, self.loop, self.router)
            self.router.add_device(dev, vm.group)
            self.devices[vm.name] = dev
            dev.start()
            self.hybrid.add_vm(vm.name, vm.cid, vm.uds_path)
        self.control.start()
        if self.cfg.pcap:
            self.start_pcap(self.cfg.pcap)

    def close(self) -> None:
        """Reset every connection, close every device, unlink every socket."""
        try:
            self.hybrid.close()
        except Exception:
            log.exception("closing the host side")
        for name, dev in self.devices.items():
            try:
                dev.flush()
            except Exception:
                pass
            try:
                dev.close()
            except Exception:
                log.exception("%s: closing the device", name)
        self.control.close()
        self.stop_pcap()

    # --- pcap -----------------------------------------------------------------------------
    def start_pcap(self, path: str, snaplen: int = 65535) -> int:
        """Add a capture (a file or a FIFO); returns its id for stop_pcap."""
        w = PcapWriter(path, snaplen)
        self._pcap_ids += 1
        self.pcaps[self._pcap_ids] = w
        self.router.capture = self._capture
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(1.0, self._flush_pcap)
        log.info("capture %d to %s", self._pcap_ids, path)
        return self._pcap_ids

    def _capture(self, hdr: Any, payload: list[memoryview]) -> None:
        for pid, w in list(self.pcaps.items()):
            try:
                w.write(hdr, payload)
            except OSError as e:              # a live reader went away: only that capture ends
                log.info("capture %d (%s) ended: %s", pid, w.path, e)
                self.stop_pcap(pid)

    def stop_pcap(self, pid: int | None = None) -> int:
        """Close one capture (or all); returns how many were closed."""
        ids = list(self.pcaps) if pid is None else [pid] if pid in self.pcaps else []
        for i in ids:
            w = self.pcaps.pop(i)
            try:
                w.close()
            except OSError:
                pass
            log.info("capture %d (%s) closed (%d packets)", i, w.path, w.packets)
        if not self.pcaps:
            self.router.capture = None
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
        return len(ids)

    def _flush_pcap(self) -> None:
        for pid, w in list(self.pcaps.items()):
            try:
                w.flush()
            except OSError as e:
                log.info("capture %d (%s) ended: %s", pid, w.path, e)
                self.stop_pcap(pid)
        self._flush_timer = self.loop.call_later(1.0, self._flush_pcap) if self.pcaps else None

    # --- control --------------------------------------------------------------------------
    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "stats":
            snap = self.router.snapshot()
            for name, dev in self.devices.items():
                snap["vms"][name]["device"] = dict(getattr(dev, "stats", {}))
                snap["vms"][name]["connected"] = bool(getattr(dev, "connected", False))
                snap["vms"][name]["rx_accel"] = getattr(dev, "accel", None) is not None
            snap["loop"] = type(self.loop).__module__.split(".")[0]   # uvloop or asyncio
            return {"ok": True, **snap}
        if cmd == "reset":
            vm = req.get("vm")
            if vm not in self.devices:
                return {"ok": False, "error": f"unknown vm {vm!r}"}
            return {"ok": True, "reset": self.router.reset_vm(vm, notify_guest=True)}
        if cmd == "fault":
            kind = req.get("kind", req.get("action"))
            vm = req.get("vm")
            if vm is not None and vm not in self.devices:
                return {"ok": False, "error": f"unknown vm {vm!r}"}
            if kind == "clear":
                n = len(self.router.faults.rules)
                self.router.faults.rules.clear()
                return {"ok": True, "cleared": n}
            if kind == "transport_reset":
                if vm is None:
                    return {"ok": False, "error": "transport_reset needs a vm"}
                return {"ok": True, "reset": self.router.reset_vm(vm, notify_guest=True)}
            rule = self.router.faults.add(FaultInjector.parse(req))
            log.info("fault added: %s", rule)
            return {"ok": True, "rules": len(self.router.faults.rules), "key": rule.key}
        if cmd == "faults":                     # the hit counters, for the report
            return {"ok": True, "seed": self.router.faults.seed,
                    "faults": self.router.faults.report()}
        if cmd == "seed":                       # a new seed (and no rules) for the next run
            seed = req.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                return {"ok": False, "error": "seed: a non-negative integer"}
            self.router.faults.rules.clear()
            self.router.faults.added = 0
            self.router.faults.reseed(seed)
            return {"ok": True, "seed": seed}
        if cmd == "pcap":
            path = req.get("path")
            if path:
                return {"ok": True, "id": self.start_pcap(str(path),
                                                          int(req.get("snaplen", 65535)))}
            return {"ok": True, "stopped": self.stop_pcap(req.get("id"))}
        return {"ok": False, "error": f"unknown cmd {cmd!r}"}


def _setup_logging(cfg: BackendConfig) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    handler = (logging.StreamHandler(open_private(cfg.log, "a", buffering=1)) if cfg.log
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level, logging.INFO))


ENV_NO_UVLOOP = "VMLAB_NO_UVLOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv, in C: a backend wakeup runs no Python of the loop's own)
    where it is installed, as it is with vmlab; the standard library's selector loop with
    VMLAB_NO_UVLOOP=1 or without uvloop. The backend uses only what both provide: readers,
    writers, call_soon/call_later, signal handlers."""
    if os.environ.get(ENV_NO_UVLOOP, "") in ("", "0"):
        try:
            import uvloop
        except ImportError:
            log.info("uvloop not installed: standard asyncio event loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmlab.vsock.backend",
                                 description="vhost-user-vsock backend for a vmlab lab")
    ap.add_argument("--config", required=True, help="JSON config (see docs/backend.md)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"vmlab vsock backend: bad config: {e}", file=sys.stderr, flush=True)
        return 2
    _setup_logging(cfg)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    def on_loop_error(lp: asyncio.AbstractEventLoop, ctx: dict) -> None:
        log.error("event loop: %s", ctx.get("message"), exc_info=ctx.get("exception"))
    loop.set_exception_handler(on_loop_error)

    backend = Backend(cfg, loop)
    rc = 0
    try:
        backend.start()
    except Exception as e:
        log.exception("startup failed")
        print(f"vmlab vsock backend: startup failed: {e}", file=sys.stderr, flush=True)
        backend.close()
        loop.close()
        return 1
    stopping: list[str] = []

    def stop(signame: str) -> None:
        if not stopping:
            stopping.append(signame)
            log.info("%s: shutting down", signame)
            loop.stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    log.info("serving %d VM(s): %s", len(cfg.vms),
             ", ".join(f"{v.name}(cid {v.cid})" for v in cfg.vms))
    try:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
    except OSError:
        pass
    profile_path = os.environ.get("VMLAB_BACKEND_PROFILE")   # benchmarks: cProfile the loop
    profiler = None
    if profile_path:
        import cProfile
        profiler = cProfile.Profile(time.process_time)   # CPU, not wall: the machine is shared
        profiler.enable()
    try:
        loop.run_forever()
    except Exception:
        log.exception("event loop died")
        rc = 1
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        backend.close()
        # let the RSTs queued by close() reach guests whose rings are still up
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        log.info("exit %d", rc)
        logging.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
