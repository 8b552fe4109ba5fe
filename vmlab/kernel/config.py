"""The guest kernel's .config: tinyconfig + vmlab's required options + the user's fragment.

vmlab's options (``vmlab.config`` next to this file) must all be built in (=y): a minimal
kernel has no modules, so anything left as =m or dropped by Kconfig (an unmet dependency, a
fragment that turns it off) would show up later as a guest that cannot do vsock. `check_config`
says exactly which options did not stick, instead of that late failure.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class ConfigError(RuntimeError):
    """A config fragment is malformed, or the final .config lacks a required option."""


def vmlab_fragment_path() -> Path:
    return Path(__file__).resolve().parent / "vmlab.config"


def vmlab_fragment() -> str:
    return vmlab_fragment_path().read_text()


def fast_fragment() -> str:
    """Boot-speed preferences (vmlab-fast.config): applied, but not required."""
    return (Path(__file__).resolve().parent / "vmlab-fast.config").read_text()


def parse_config(text: str, where: str = "config") -> dict[str, str]:
    """CONFIG_X=value and `# CONFIG_X is not set` (as "n") lines; other comments skipped.

    Raises ConfigError naming ``where``:line for a line that is neither.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
            continue
        if line.startswith("#"):
            continue
        raise ConfigError(f"{where}:{number}: not a Kconfig line: {raw!r} "
                          "(expected CONFIG_NAME=value or '# CONFIG_NAME is not set')")
    return out


def required_options() -> list[str]:
    """The options vmlab needs built in, in the order of vmlab.config."""
    opts = parse_config(vmlab_fragment(), str(vmlab_fragment_path()))
    return [name for name, value in opts.items() if value == "y"]


@dataclass(frozen=True)
class Fragment:
    """The user's extra options (e.g. KASAN, lockdep), parsed, with where they came from."""

    text: str
    origin: str

    @classmethod
    def load(cls, path: Path | None) -> "Fragment":
        if path is None:
            return cls("", "")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config fragment {path}: {exc}") from exc
        frag = cls(text, str(path))
        frag.options()  # validate now, not after tinyconfig
        return frag

    def options(self) -> dict[str, str]:
        return parse_config(self.text, self.origin or "fragment")


def merged_fragment(user: Fragment) -> str:
    """What is appended to the tinyconfig .config: vmlab's options, its boot-speed choices, then the
    user's fragment (later lines win in Kconfig)."""
    parts = ["# --- vmlab required options", vmlab_fragment().rstrip(),
             "# --- vmlab boot-speed choices", fast_fragment().rstrip()]
    if user.text.strip():
        parts += [f"# --- user fragment {user.origin}", user.text.rstrip()]
    return "\n".join(parts) + "\n"


def config_inputs_hash(user: Fragment) -> str:
    """Hash of everything that decides the .config (used in the build's cache key)."""
    return hashlib.sha256(merged_fragment(user).encode()).hexdigest()


def turned_off(user: Fragment) -> dict[str, str]:
    """vmlab options the user's fragment deliberately sets to something other than =y.

    Allowed: a kernel without, say, vsock_loopback is exactly what a bisect or a reproduction may
    need; the build says so (a guest on it lacks that feature) instead of refusing."""
    wanted = user.options() if user.text else {}
    return {name: wanted[name] for name in required_options() if wanted.get(name, "y") != "y"}


def check_config(final_text: str, user: Fragment) -> list[str]:
    """Problems with the final .config (after olddefconfig); empty when it is what was asked for.

    Every vmlab option must be =y unless the user's fragment turns it off (`turned_off`); every
    option the user's fragment sets must have kept its value (Kconfig silently drops values whose
    dependencies are unmet).
    """
    final = parse_config(final_text, ".config")
    wanted_by_user = user.options() if user.text else {}
    off = turned_off(user)
    problems = []
    for name in required_options():
        got = final.get(name, "n")
        if got == "y" or name in off:
            continue
        problems.append(f"{name}={got}: vmlab needs it built in (=y); Kconfig dropped it "
                        "(a dependency is unmet - see its 'depends on' in the source's Kconfig)")
    for name, value in wanted_by_user.items():
        got = final.get(name, "n")
        if got != value and (name not in required_options() or name in off):
            problems.append(f"{name}: the fragment {user.origin} asks for {value}, the final .config "
                            f"has {got} (a dependency is unmet or the value is invalid)")
    return problems


def config_hash(final_text: str) -> str:
    """Short, stable identity of a final .config: sha256 of its option lines (comments ignored)."""
    lines = sorted(f"{k}={v}" for k, v in parse_config(final_text).items() if v != "n")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
