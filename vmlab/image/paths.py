"""Where the guest image recipe (the `images/` directory) lives.

The recipe is the guest `/init` script and the `vmlab-guest` C source. The repository keeps it
in the top-level `images/` directory (the single source); a wheel ships the same files as package
data at `vmlab/_images/` (pyproject.toml maps `images/` to the `vmlab._images` package). Lookup
order:

1. `$VMLAB_IMAGES_DIR` (a directory laid out like `images/`), if set;
2. `vmlab/_images` inside the installed package (wheel / non-editable install);
3. `images/` of the source checkout this module sits in (editable install, plain checkout).
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV = "VMLAB_IMAGES_DIR"
INIT = "init"
HELPER_SOURCE = "guest/vmlab-guest.c"
RECIPE_FILES = (INIT, HELPER_SOURCE)


def _packaged() -> Path | None:
    """vmlab/_images of an installed wheel, or None (editable install / checkout)."""
    try:
        ref = resources.files("vmlab") / "_images"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - vmlab is a regular package
        return None
    # Wheels are installed as plain files, so the Traversable is a real path; a zipped vmlab
    # (zipimport) has no recipe on disk and falls through to the checkout below.
    path = Path(str(ref))
    return path if (path / INIT).is_file() else None


def _checkout() -> Path:
    return Path(__file__).resolve().parents[2] / "images"


def images_dir() -> Path:
    """The directory holding the recipe: `init` and `guest/vmlab-guest.c`."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    return _packaged() or _checkout()


def init_script() -> Path:
    """The guest /init script (may not exist; the builder reports that)."""
    return images_dir() / INIT


def helper_source() -> Path:
    """The vmlab-guest C source (may not exist; the builder reports that)."""
    return images_dir() / HELPER_SOURCE


def recipe_files() -> dict[str, Path]:
    """Every recipe file by its name relative to the images directory."""
    root = images_dir()
    return {name: root / name for name in RECIPE_FILES}
