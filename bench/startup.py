"""Start to READY=1: how long systemd waits for the real daemon, on the sim backends.

Each run spawns `python -m daemon.cli run` with $NOTIFY_SOCKET naming a datagram socket
owned here, and times spawn -> READY=1 (interpreter start, imports, config, opening the
journal, the card loop ready), then SIGTERM -> exit. Beside it, in the same run and
interleaved with it so that the machine's noise hits both alike: a bare interpreter
(`python -c pass`) and an interpreter that imports exactly the modules the daemon imports
from outside tapgate (recorded with -X importtime), which is as fast as tapgate could
start without trimming its dependencies. Then the import-time breakdown: what to trim.

Bytecode is controlled, not inherited from the caller's environment: the timed runs have
every module's bytecode cached (in a scratch PYTHONPYCACHEPREFIX, filled by an untimed
run; the work tree gets no __pycache__), as the installed service has it from `make
install`'s compileall. One more series has no bytecode at all (PYTHONDONTWRITEBYTECODE=1,
an empty cache): what every start would cost if the venv were not compiled, since the unit
sets PYTHONDONTWRITEBYTECODE and its /opt is read-only.

    python -m bench.startup [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import pct, scratch_dir

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "tapgate.toml"  # what `make run` runs: the sim backends
PROJECT = ("daemon", "hal", "headend")
MAIN = "daemon.cli (__main__)"
TARGET_S = 1.0
TIMEOUT_S = 60.0
IMPORTTIME_RUNS = 5


@dataclass(frozen=True)
class Bytecode:
    """Where the interpreter finds (and may write) bytecode."""

    cache: Path  # PYTHONPYCACHEPREFIX
    write: bool

    def env(self, notify: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TAPGATE_")
               and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                             "PYTHONPROFILEIMPORTTIME", "PYTHONDONTWRITEBYTECODE")}
        env["PYTHONPYCACHEPREFIX"] = str(self.cache)
        if not self.write:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify
        return env


@dataclass
class Start:
    ready_s: float
    stop_s: float
    stderr: str


class Notify:
    """systemd's notify socket."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="tg-bench-")  # AF_UNIX paths are short
        self.address = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)

    def wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> bool:
        while time.monotonic() < deadline and proc.poll() is None:
            self.sock.settimeout(0.5)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return True
        return False

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def start_daemon(notify: Notify, journal: Path, bytecode: Bytecode,
                 *python_flags: str) -> Start:
    argv = [sys.executable, *python_flags, "-m", "daemon.cli", "run", "--config", str(CONFIG),
            "--set", f'journal.path="{journal}"']
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=bytecode.env(notify.address),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            if not notify.wait_ready(proc, time.monotonic() + TIMEOUT_S):
                proc.kill()
                proc.wait()
                err.seek(0)
                sys.exit(f"the daemon never sent READY=1 (exit {proc.returncode}):\n"
                         + err.read().decode(errors="replace")[-3000:])
            ready = time.perf_counter() - started
            stopping = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(TIMEOUT_S)
            stop = time.perf_counter() - stopping
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        text = err.read().decode(errors="replace")
    if rc != 0:
        sys.exit(f"the daemon exited {rc} on SIGTERM:\n{text[-3000:]}")
    return Start(ready, stop, text)


def time_python(code: str, bytecode: Bytecode) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=bytecode.env(), check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


# --- -X importtime ---------------------------------------------------------------------------
@dataclass
class Imported:
    name: str
    self_us: int
    cumulative_us: int
    parent: str | None  # the module whose import imported it; None at the top


def parse_importtime(stderr: str) -> list[Imported]:
    rows: list[tuple[str, int, int, int]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        head, cumulative_us, field = line.split("|", 2)
        self_us = head.split(":", 1)[1]
        text = field[1:]  # one space after the bar, then two per nesting level
        depth = (len(text) - len(text.lstrip(" "))) // 2
        rows.append((text.strip(), int(self_us), int(cumulative_us), depth))
    # children are printed before their parent: walking backwards, a module's parent is the
    # last module seen one level up
    out: list[Imported] = []
    above: dict[int, str] = {}
    for name, self_us, cumulative_us, depth in reversed(rows):
        above[depth] = name
        out.append(Imported(name, self_us, cumulative_us, above.get(depth - 1) if depth else None))
    out.reverse()
    # `python -m daemon.cli` runs daemon.cli as __main__, which is never "imported": what it
    # imports shows at the top level, after runpy (which the interpreter imports for -m)
    after_runpy = False
    for m in out:
        if m.parent is None and after_runpy:
            m.parent = MAIN
        after_runpy = after_runpy or m.name == "runpy"
    return out


def median_profile(profiles: list[list[Imported]]) -> list[Imported]:
    """Per module, the median self and cumulative time over the runs (order of the first)."""
    by_name = [{m.name: m for m in profile} for profile in profiles]
    out = []
    for m in profiles[0]:
        seen = [runs[m.name] for runs in by_name if m.name in runs]
        out.append(Imported(m.name, round(statistics.median(s.self_us for s in seen)),
                            round(statistics.median(s.cumulative_us for s in seen)), m.parent))
    return out


def _ours(name: str | None) -> bool:
    return name is not None and (name == MAIN or name.split(".")[0] in PROJECT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    work = scratch_dir()
    journal = work / "journal.db"
    cached = Bytecode(work / "pycache", write=True)
    (work / "empty").mkdir()
    uncompiled = Bytecode(work / "empty", write=False)
    notify = Notify()
    try:
        # untimed: the journal made (its schema migrated), the bytecode cache filled, the
        # disk caches warm
        start_daemon(notify, journal, cached)
        # what the daemon imports, and what each import costs: the median of a few runs,
        # as one run on a shared machine is noisy
        profiles = [parse_importtime(
                        start_daemon(notify, journal, cached, "-X", "importtime").stderr)
                    for _ in range(IMPORTTIME_RUNS)]
        modules = median_profile(profiles)
        foreign = [m.name for m in modules if not _ours(m.name)]
        same_imports = ("import importlib\n"
                        f"for name in {foreign!r}:\n"
                        "    try:\n"
                        "        importlib.import_module(name)\n"
                        "    except Exception:\n"
                        "        pass\n")
        time_python(same_imports, cached)

        ready, stop, bare, imports, cold = [], [], [], [], []
        for _ in range(args.runs):
            start = start_daemon(notify, journal, cached)
            ready.append(start.ready_s)
            stop.append(start.stop_s)
            bare.append(time_python("pass", cached))
            imports.append(time_python(same_imports, cached))
            cold.append(start_daemon(notify, journal, uncompiled).ready_s)
    finally:
        notify.close()
        shutil.rmtree(work, ignore_errors=True)

    def line(name: str, seconds: list[float]) -> str:
        ms = [s * 1000 for s in seconds]
        return f"{name:<44} p50 {pct(ms, 50):7.1f} ms   p99 {pct(ms, 99):7.1f} ms"

    print(f"runs: {args.runs} (sim backends, {CONFIG.relative_to(ROOT)}, an existing journal)")
    print(line("tapgate spawn -> READY=1", ready))
    print(line("baseline: python -c pass", bare))
    print(line(f"baseline: python importing the same {len(foreign)} modules", imports))
    print(line("tapgate SIGTERM -> exit", stop))
    print(line("tapgate spawn -> READY=1, no bytecode at all", cold))
    p50 = pct(ready, 50)
    print(f"READY p50 / same-imports p50: {p50 / pct(imports, 50):.2f}x;  "
          f"target <= {TARGET_S:.1f} s: {'met' if pct(ready, 99) <= TARGET_S else 'MISSED'} "
          f"(p99 {pct(ready, 99):.3f} s)")

    total = sum(m.cumulative_us for m in modules if m.parent in (None, MAIN))
    ours = sum(m.self_us for m in modules if _ours(m.name))
    entries = [m for m in modules if not _ours(m.name) and (m.parent is None or _ours(m.parent))]
    print(f"\nimport time (median of {IMPORTTIME_RUNS} -X importtime runs, which inflates it): "
          f"{total / 1000:.1f} ms in all,\n  {ours / 1000:.1f} ms of it in tapgate's own "
          "modules (self time)")
    print("top 10 dependencies by cumulative import time (what tapgate imports directly):")
    for m in sorted(entries, key=lambda m: m.cumulative_us, reverse=True)[:10]:
        by = m.parent or "(interpreter start)"
        print(f"  {m.cumulative_us / 1000:7.1f} ms  {m.name:<40} imported by {by}")
    print("top 10 modules by self import time:")
    for m in sorted(modules, key=lambda m: m.self_us, reverse=True)[:10]:
        print(f"  {m.self_us / 1000:7.1f} ms  {m.name}")


if __name__ == "__main__":
    main()
