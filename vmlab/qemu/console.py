"""The guest's serial console, driven with pexpect.

`run(cmd)` brackets each command with unique markers, so output of one command never leaks into the
next, and returns (exit code, output). Everything read is scanned for kernel oops/panic/KASAN/BUG
lines: they are kept in `kernel_errors` and the lab reports them as failures.
"""

from __future__ import annotations

import collections
import re
import socket
import time
import uuid
from pathlib import Path

import pexpect
import pexpect.fdpexpect

READY_MARKER = "VMLAB-READY"

KERNEL_ERROR_PATTERNS = re.compile(
    r"Kernel panic - not syncing|\bOops\b|\bBUG: |kernel BUG at|KASAN: |UBSAN: |KFENCE: |"
    r"general protection fault|WARNING: CPU: \d+ PID: |Unable to handle kernel|"
    r"watchdog: BUG: soft lockup|rcu: INFO: rcu_\w+ self-detected stall|VMLAB-MODULE-FAIL"
)


PANIC = re.compile(r"Kernel panic - not syncing")
BOOT_FAIL = re.compile(r"VMLAB-(?:ROOTFS|FILES)-FAIL[^\r\n]*")
"""What the init prints when a `rootfs: host` guest cannot set up its root (never comes up right)."""
PANIC_END = re.compile(r"---\[ end Kernel panic[^\n]*")


class ConsoleError(RuntimeError):
    """The console did not answer as expected; the message carries the last console lines."""


class KernelError(ConsoleError):
    """The guest kernel reported an oops, panic, KASAN or BUG."""


class _Watcher:
    """pexpect `logfile_read` sink: remembers recent lines and spots kernel errors as they stream by."""

    def __init__(self, keep_lines: int = 60) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.kernel_errors: list[str] = []
        self._partial = ""

    def write(self, text: str) -> None:
        self._partial += text
        *complete, self._partial = re.split(r"\r?\n", self._partial)
        for line in complete:
            line = line.rstrip("\r")
            self.lines.append(line)
            if KERNEL_ERROR_PATTERNS.search(line):
                self.kernel_errors.append(line)

    def flush(self) -> None:
        pass

    def tail(self) -> str:
        return "\n".join([*self.lines, self._partial][-25:])


class Console:
    """One connection to a VM's serial socket (QEMU is the server, vmlab the only client)."""

    def __init__(self, socket_path: Path, name: str = "vm") -> None:
        self.socket_path = socket_path
        self.name = name
        self._sock: socket.socket | None = None
        self._child: pexpect.fdpexpect.fdspawn | None = None
        self._watch = _Watcher()
        self._shell_ready = False

    # -- connection -----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise ConsoleError(f"{self.name}: QEMU exited before its serial console was reachable")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"{self.name}: serial socket {self.socket_path} never appeared") from None
                time.sleep(0.01)  # QEMU creates the socket within milliseconds; poll closely
        self._sock = sock
        self._child = pexpect.fdpexpect.fdspawn(sock.fileno(), encoding="utf-8", codec_errors="replace",
                                                timeout=30, maxread=65536)
        self._child.logfile_read = self._watch
        self._child.delaybeforesend = None

    def close(self) -> None:
        """Drain what is pending (so late kernel errors are still seen) and disconnect."""
        if self._child is not None:
            try:
                self._child.read_nonblocking(1 << 20, timeout=0)
            except (pexpect.TIMEOUT, pexpect.EOF, OSError, ValueError):
                pass
            self._child = None
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in expect() with EOF
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        self._shell_ready = False

    @property
    def connected(self) -> bool:
        return self._child is not None

    @property
    def kernel_errors(self) -> list[str]:
        return list(self._watch.kernel_errors)

    def tail(self) -> str:
        """The last console lines (for error messages)."""
        return self._watch.tail()

    def _fail(self, message: str, cls: type[ConsoleError] = ConsoleError) -> ConsoleError:
        return cls(f"{self.name}: {message}\n--- last console lines ---\n{self.tail()}")

    def _expect(self, pattern, timeout: float) -> int:
        assert self._child is not None, "console not connected"
        try:
            return self._child.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            raise self._fail(f"timed out after {timeout:g}s waiting for {getattr(pattern, 'pattern', pattern)!r}") from None
        except pexpect.EOF:
            raise self._fail("console closed (QEMU exited?)") from None

    def check_kernel(self) -> None:
        """Raise KernelError if the guest kernel has reported an oops/panic/BUG so far."""
        if self._watch.kernel_errors:
            raise self._fail("guest kernel error: " + self._watch.kernel_errors[0], KernelError)

    # -- boot and commands ----------------------------------------------------------------
    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the init's ready marker, then put the shell in a scriptable state."""
        self._shell_ready = False
        idx = self._expect([re.compile(r"^" + READY_MARKER + r"\r?$", re.M), PANIC, BOOT_FAIL], timeout)
        if idx == 1:
            self._expect(PANIC_END, 10)
            raise self._fail("guest kernel panicked during boot", KernelError)
        if idx == 2:
            assert self._child is not None
            raise self._fail(f"guest init failed: {self._child.after}")
        self._setup_shell(timeout=30)

    def _setup_shell(self, timeout: float) -> None:
        assert self._child is not None
        token = uuid.uuid4().hex[:10]
        # Echo off and empty prompts: command output is then exactly what the command printed.
        self._child.send(f"stty -echo 2>/dev/null; PS1=''; PS2=''; export PS1 PS2; echo SETUP''{token}\n")
        self._expect(re.compile(f"SETUP{token}\r?\n"), timeout)
        self._shell_ready = True

    def run(self, command: str, timeout: float = 30.0, check_kernel: bool = True) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit code, output with \\n line ends)."""
        if self._child is None:
            raise ConsoleError(f"{self.name}: console not connected")
        if not self._shell_ready:
            self._setup_shell(timeout)
        token = uuid.uuid4().hex[:12]
        begin, end = f"<<B{token}>>", f"<<E{token}:"
        # The quotes split each marker in the command text, so an echoed command can never match.
        # A subshell, so that `exit` in a command ends the command, not the console's shell.
        line = f"echo '<<B'{token}'>>'; ( {command}\n) </dev/null; echo '<<E'{token}:$?'>>'\n"
        self._child.send(line)
        self._expect(re.compile(re.escape(begin) + r"\r?\n"), timeout)
        try:
            if self._expect([re.compile(re.escape(end) + r"(\d+)>>\r?\n"), PANIC], timeout) == 1:
                self._expect(PANIC_END, 10)
                raise self._fail(f"guest kernel panicked while running `{command}`", KernelError)
        except KernelError:
            raise
        except ConsoleError:
            self.interrupt()
            raise
        output = self._child.before.replace("\r\n", "\n").replace("\r", "")
        rc = int(self._child.match.group(1))
        if check_kernel:
            self.check_kernel()
        return rc, output

    def interrupt(self) -> None:
        """Ctrl-C the foreground command so the next run() starts from a clean prompt."""
        if self._child is not None:
            try:
                self._child.send("\x03\n")
            except OSError:
                pass
            self._shell_ready = False

    def send_line(self, text: str) -> None:
        """Raw input to the console (for interactive use and tests of the console itself)."""
        assert self._child is not None, "console not connected"
        self._child.send(text + "\n")

    def expect(self, regex: str, timeout: float = 30.0) -> str:
        """Wait for a regex in the console stream; returns the matched text."""
        self._expect(re.compile(regex), timeout)
        assert self._child is not None
        return self._child.after if isinstance(self._child.after, str) else ""
