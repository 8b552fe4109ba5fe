"""Field-level checks shared by the scenario rules: types, ranges, choices, paths, messages.

A `FieldChecker` looks at one attribute of a dataclass at a time and reports at that attribute's
YAML location (from the parser's `Where`) or, for objects built in Python, at "<inline>".
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Iterable

from vmlab.scenario.model import Location, Problem, Scenario, Where


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe(value: Any) -> str:
    """How a wrong value looks in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, (dict,)):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, int):
        return f"integer {value}"
    return type(value).__name__


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class FieldChecker:
    """Accumulates problems and warnings; `obj` arguments are dataclasses with `where`/`location`."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.file = scenario.location.file if scenario.location is not None else scenario.file
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    # -- reporting -------------------------------------------------------------------------
    def at(self, obj: Any, fld: str | None = None) -> Location:
        where: Where | None = getattr(obj, "where", None)
        if fld is not None and where is not None and fld in where.fields:
            return where.fields[fld]
        loc = getattr(obj, "location", None)
        return loc if loc is not None else Location(self.file)

    def _prefix(self, obj: Any, fld: str | None, ctx: str) -> str:
        where: Where | None = getattr(obj, "where", None)
        if fld is not None and where is not None and fld in where.ctx:
            return where.ctx[fld]
        return ctx

    def error(self, obj: Any, fld: str | None, ctx: str, message: str) -> None:
        self.problems.append(self.at(obj, fld).problem(self._prefix(obj, fld, ctx) + message))

    def warn(self, obj: Any, fld: str | None, ctx: str, message: str) -> None:
        self.warnings.append(self.at(obj, fld).problem(self._prefix(obj, fld, ctx) + message))

    def ref(self, loc: Location, before: str) -> str:
        """' (first defined at line 6)'-style pointer to another place; '' when it has no position."""
        if loc.line <= 0:
            return ""
        where = f"line {loc.line}" if loc.file == self.file else str(loc)
        return f" ({before} {where})"

    def skip(self, obj: Any, fld: str) -> bool:
        where: Where | None = getattr(obj, "where", None)
        return where is not None and fld in where.reported

    # -- generic field checks (return True when the value is usable) -------------------------
    def required(self, obj: Any, fld: str, ctx: str) -> bool:
        if self.skip(obj, fld):
            return False
        if getattr(obj, fld, None) is None:
            self.error(obj, fld, ctx, f"'{fld}' is required")
            return False
        return True

    def typed(self, obj: Any, fld: str, ctx: str, ok: bool, expected: str) -> bool:
        if self.skip(obj, fld):
            return False
        if not ok:
            got = describe(getattr(obj, fld, None))
            self.error(obj, fld, ctx, f"{fld}: expected {expected}, got {got}")
        return ok

    def str_field(self, obj: Any, fld: str, ctx: str, required: bool = False) -> bool:
        value = getattr(obj, fld, None)
        if value is None:
            return self.required(obj, fld, ctx) if required else False
        return self.typed(obj, fld, ctx, isinstance(value, str), "a string")

    def bool_field(self, obj: Any, fld: str, ctx: str) -> bool:
        return self.typed(obj, fld, ctx, isinstance(getattr(obj, fld, None), bool), "true or false")

    def int_field(self, obj: Any, fld: str, ctx: str, lo: int, hi: int | None = None,
                  required: bool = False) -> bool:
        value = getattr(obj, fld, None)
        if value is None:
            return self.required(obj, fld, ctx) if required else False
        expected = f"an integer >= {lo}" if hi is None else f"an integer {lo}..{hi}"
        if not self.typed(obj, fld, ctx, is_int(value), expected):
            return False
        if value < lo or (hi is not None and value > hi):
            self.error(obj, fld, ctx, f"{fld}: {value} is out of range, expected {expected}")
            return False
        return True

    def number_field(self, obj: Any, fld: str, ctx: str, lo: float, hi: float | None = None,
                     positive: bool = False, required: bool = False) -> bool:
        value = getattr(obj, fld, None)
        if value is None:
            return self.required(obj, fld, ctx) if required else False
        if positive:
            expected = "a number of seconds > 0"
        elif hi is None:
            expected = f"a number >= {lo}"
        else:
            expected = f"a number {lo}..{hi}"
        if not self.typed(obj, fld, ctx, is_number(value), expected):
            return False
        if (positive and value <= 0) or value < lo or (hi is not None and value > hi):
            self.error(obj, fld, ctx, f"{fld}: {value} is out of range, expected {expected}")
            return False
        return True

    def choice_field(self, obj: Any, fld: str, ctx: str, choices: Iterable[str],
                     required: bool = False, what: str | None = None) -> bool:
        value = getattr(obj, fld, None)
        choices = tuple(choices)
        if value is None:
            return self.required(obj, fld, ctx) if required else False
        if not self.typed(obj, fld, ctx, isinstance(value, str), "one of " + ", ".join(choices)):
            return False
        if value not in choices:
            self.error(obj, fld, ctx, f"{fld}: unknown {what or fld} '{value}'; expected one of "
                       f"{', '.join(choices)}{suggest(value, choices)}")
            return False
        return True

    def regex_field(self, obj: Any, fld: str, ctx: str, required: bool = False) -> bool:
        if not self.str_field(obj, fld, ctx, required):
            return False
        try:
            re.compile(getattr(obj, fld))
        except re.error as exc:
            self.error(obj, fld, ctx, f"{fld}: invalid regular expression: {exc}")
            return False
        return True

    def path_field(self, obj: Any, fld: str, ctx: str, kind: str, value: Any = None,
                   key: str | None = None) -> bool:
        """kind: 'file', 'dir' or 'any'. `key` names the location entry (defaults to fld)."""
        key = key or fld
        value = getattr(obj, fld, None) if value is None else value
        if self.skip(obj, key) or value is None:
            return False
        if not isinstance(value, (str, Path)) or str(value) == "":
            self.error(obj, key, ctx, f"{key}: expected a path, got {describe(value)}")
            return False
        path = Path(value)
        if not path.exists():
            self.error(obj, key, ctx, f"{key}: {path} does not exist")
            return False
        if kind == "file" and not path.is_file():
            self.error(obj, key, ctx, f"{key}: {path} is not a file")
            return False
        if kind == "dir" and not path.is_dir():
            self.error(obj, key, ctx, f"{key}: {path} is not a directory")
            return False
        return True
