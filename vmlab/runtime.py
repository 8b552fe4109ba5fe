"""Private runtime directories: one per lab, mode 0700, removed when the lab closes.

Unix socket paths are limited to 107 bytes, so the base is short (`$XDG_RUNTIME_DIR/vmlab` or
`/tmp/vmlab-$UID`) and lab directories have short random names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "lab.json"
_PRIVATE = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private(path: str | Path, mode: str = "ab", buffering: int = -1):
    """Open a log/state file for writing, created 0600, never through a symlink (ELOOP): a
    link planted in the runtime dir must not make vmlab write someone else's file.
    mode: "ab"/"a" append, "wb"/"w" truncate."""
    flags = _PRIVATE | os.O_WRONLY | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        return os.fdopen(fd, mode, buffering)
    except BaseException:
        os.close(fd)
        raise


def runtime_base() -> Path:
    """Where labs live; created 0700 and refused if someone else owns it."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "vmlab" if xdg and Path(xdg).is_dir() else Path(tempfile.gettempdir()) / f"vmlab-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"runtime dir {base} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        os.chmod(base, 0o700)
    return base


@dataclass
class RuntimeDir:
    """The one owner of a lab's runtime directory."""

    path: Path

    @classmethod
    def create(cls, prefix: str = "lab-") -> "RuntimeDir":
        return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_base())))

    @property
    def lab_id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def write_state(self, state: dict) -> None:
        """Describe the running lab for `vmlab console` / `vmlab ls` in another terminal."""
        tmp = self.path / (STATE_FILE + ".tmp")
        with open_private(tmp, "w") as f:
            f.write(json.dumps(state, indent=2))
        tmp.replace(self.path / STATE_FILE)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def running_labs() -> list[dict]:
    """State of every lab whose owning process is still alive."""
    labs = []
    try:
        base = runtime_base()
    except OSError:
        return labs
    for state_file in sorted(base.glob(f"*/{STATE_FILE}")):
        try:
            state = json.loads(state_file.read_text())
            os.kill(int(state["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue
        state["run_dir"] = str(state_file.parent)
        labs.append(state)
    return labs
