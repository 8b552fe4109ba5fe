"""`vmlab bisect GOOD BAD -- SCENARIO`: git bisect run with a kernel build and `vmlab run`.

Each step (this module's __main__, run by `git bisect run` at every commit it checks out):
build the commit (vmlab's recipe or --build-cmd; cached like `vmlab kernel build`), then run the
scenario on it --repeat times. Verdicts follow git's contract: a build failure is exit 125
(skip: the commit cannot be tested), any failing run (a step failed, a kernel oops, or the
lab did not come up - a kernel that does not boot is broken) is bad, all runs passing is good.
An invalid scenario or Ctrl-C aborts the bisect (exit > 127) instead of marking commits.

Logs: <logs>/<commit12>/build.log, run-N/ (vmlab run --artifacts), run-N.out, run-N.xml; and
steps.jsonl (one verdict per line), bisect.log (git's output), git-bisect-log.txt.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

SKIP, ABORT = 125, 128
_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.M)


class BisectError(RuntimeError):
    """The bisect cannot start or could not finish; the message says why."""


@dataclass
class BisectOptions:
    good: str
    bad: str
    scenario: Path
    run_args: list[str] = field(default_factory=list)
    src: Path = Path(".")
    repeat: int = 1
    build_cmd: str | None = None
    config: Path | None = None
    jobs: int | None = None
    logs: Path | None = None


@dataclass
class BisectResult:
    first_bad: str | None
    subject: str
    steps: list[dict]
    logs: Path


def _git(src: Path, *args: str, check: bool = True) -> str:
    r = subprocess.run(["git", "-C", str(src), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise BisectError(f"git {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def _prepare(opts: BisectOptions) -> tuple[Path, str, str, Path, Path]:
    if not shutil.which("git"):
        raise BisectError("git is not installed")
    src = Path(opts.src).expanduser().resolve()
    top = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if top.returncode != 0:
        raise BisectError(f"{src} is not a git tree (bisect needs the kernel's git history)")
    src = Path(top.stdout.strip())
    gitdir = Path(_git(src, "rev-parse", "--absolute-git-dir"))
    if (gitdir / "BISECT_START").exists():
        raise BisectError(f"a bisect is already in progress in {src} (finish it with: git -C {src} bisect reset)")
    if _git(src, "status", "--porcelain", "--untracked-files=no"):
        raise BisectError(f"{src} has uncommitted changes; bisect checks out other commits (commit or stash them)")
    if opts.repeat < 1:
        raise BisectError("--repeat must be at least 1")
    good = _git(src, "rev-parse", "--verify", "--quiet", f"{opts.good}^{{commit}}", check=False)
    bad = _git(src, "rev-parse", "--verify", "--quiet", f"{opts.bad}^{{commit}}", check=False)
    for name, sha in ((opts.good, good), (opts.bad, bad)):
        if not sha:
            raise BisectError(f"{name!r} is not a commit in {src}")
    scenario = Path(opts.scenario).expanduser().resolve()
    from vmlab.scenario import ScenarioError, load_scenario
    try:
        load_scenario(scenario)
    except (ScenarioError, OSError) as exc:
        raise BisectError(f"scenario {opts.scenario}: {exc}") from None
    logs = (opts.logs or Path.cwd() / time.strftime("vmlab-bisect-%Y%m%d-%H%M%S")).expanduser().resolve()
    logs.mkdir(parents=True, exist_ok=True)
    return src, good, bad, scenario, logs


def run_bisect(opts: BisectOptions, out: Callable[[str], None] = print) -> BisectResult:
    """Drive `git bisect run`; the tree is back on its original HEAD afterwards, always."""
    src, good, bad, scenario, logs = _prepare(opts)
    state = {"src": str(src), "scenario": str(scenario), "run_args": opts.run_args, "repeat": opts.repeat,
             "build_cmd": opts.build_cmd, "config": str(opts.config.resolve()) if opts.config else None,
             "jobs": opts.jobs, "logs": str(logs)}
    state_file = logs / "state.json"
    state_file.write_text(json.dumps(state, indent=1) + "\n")
    out(f"bisecting {src}: good {good[:12]}, bad {bad[:12]}; scenario {scenario}"
        + (f" x{opts.repeat}" if opts.repeat > 1 else "") + f"; logs in {logs}")
    output = ""
    try:
        _git(src, "bisect", "start", bad, good)
        # own session: on Ctrl-C/SIGTERM the whole git bisect run tree is stopped (the step turns
        # SIGTERM into its own teardown: make's process group, the running `vmlab run`)
        proc = subprocess.Popen(["git", "-C", str(src), "bisect", "run", sys.executable, "-m",
                                 "vmlab.kernel.bisect", str(state_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            with open(logs / "bisect.log", "w") as blog:
                for line in proc.stdout:
                    blog.write(line)
                    blog.flush()
                    output += line
                    if line.startswith("vmlab-bisect:"):
                        out(line.rstrip()[len("vmlab-bisect: "):])
            rc = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
        (logs / "git-bisect-log.txt").write_text(_git(src, "bisect", "log", check=False) + "\n")
    finally:
        subprocess.run(["git", "-C", str(src), "bisect", "reset"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    steps = _read_steps(logs)
    m = _FIRST_BAD.search(output)
    if m is None:
        tail = "\n".join(output.strip().splitlines()[-8:])
        out(f"no first bad commit found (git bisect run exited {rc}):\n{tail}")
        return BisectResult(None, "", steps, logs)
    sha = m.group(1)
    subject = _git(src, "show", "-s", "--format=%h %s", sha, check=False)
    kept = logs / sha[:12]
    out(f"first bad commit: {sha} ({subject})")
    out(f"its logs: {kept if kept.is_dir() else logs}")
    return BisectResult(sha, subject, steps, logs)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the bisect's process group, SIGKILL what is left after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_steps(logs: Path) -> list[dict]:
    path = logs / "steps.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class StepRecord:
    commit: str
    verdict: str       # good, bad, skip, abort
    reason: str
    kernel: str = ""
    seconds: float = 0.0


def bisect_step(state_file: Path) -> int:
    """One commit: build, run the scenario, return git bisect run's exit code."""
    from vmlab.kernel.build import BuildError, BuildRequest, build_kernel

    state = json.loads(Path(state_file).read_text())
    src, logs = Path(state["src"]), Path(state["logs"])
    commit = _git(src, "rev-parse", "HEAD")
    d = logs / commit[:12]
    d.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def record(verdict: str, reason: str, kernel: str = "") -> None:
        rec = StepRecord(commit, verdict, reason, kernel, round(time.monotonic() - started, 1))
        with open(logs / "steps.jsonl", "a") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
        print(f"vmlab-bisect: {commit[:12]} {verdict:5s} {reason}", flush=True)

    req = BuildRequest(src=src, fragment=Path(state["config"]) if state["config"] else None,
                       jobs=state["jobs"], build_cmd=state["build_cmd"])
    try:
        build = build_kernel(req)
    except BuildError as exc:
        if exc.log is not None and exc.log.is_file():
            shutil.copy2(exc.log, d / "build.log")
        record("skip", f"build failed: {str(exc).splitlines()[0]}")
        return SKIP
    except Exception as exc:  # noqa: BLE001 - a broken setup must stop the bisect, not mark commits
        record("abort", f"{type(exc).__name__}: {exc}")
        return ABORT
    if build.log.is_file():
        shutil.copy2(build.log, d / "build.log")
    kernel = f"build:{build.meta.key}"
    for i in range(1, state["repeat"] + 1):
        argv = [sys.executable, "-m", "vmlab", "run", state["scenario"], "--kernel", kernel,
                "--artifacts", str(d / f"run-{i}"), "--junit-xml", str(d / f"run-{i}.xml"), *state["run_args"]]
        with open(d / f"run-{i}.out", "w") as f:
            run = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd())
            try:
                rc = run.wait()
            except BaseException:
                run.terminate()  # vmlab run tears its lab down on SIGTERM
                try:
                    run.wait(60)
                except subprocess.TimeoutExpired:
                    run.kill()
                raise
        if rc == 2:
            record("abort", f"vmlab run says the scenario is invalid (see {d / f'run-{i}.out'})", build.meta.describe())
            return ABORT
        if rc == 130 or rc < 0:
            record("abort", f"vmlab run interrupted (exit {rc})", build.meta.describe())
            return ABORT
        if rc != 0:
            why = "the lab did not come up" if rc == 3 else "the scenario failed"
            record("bad", f"run {i}/{state['repeat']}: {why} (exit {rc})", build.meta.describe())
            return 1
    record("good", f"{state['repeat']} run(s) passed", build.meta.describe())
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # so make and vmlab run are torn down, not orphaned
    if len(sys.argv) != 2:
        print("usage: python -m vmlab.kernel.bisect STATE.json (run by `vmlab bisect`)", file=sys.stderr)
        sys.exit(ABORT)
    sys.exit(bisect_step(Path(sys.argv[1])))
