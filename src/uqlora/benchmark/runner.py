"""Run the cells of a benchmark that are not done, then write the report.

Each cell is an ordinary `uqlora` command. By default it runs in its own Python process (`run_subprocess`): the
wall times and peak memory it records are its own, and its output goes to OUT/logs/CELL.log. `run_in_process`
runs it in this process instead (the tests: no interpreter start per cell; peak RSS is then the process's so far).
`jobs` cells run at a time (default 1), each as soon as the runs it reads are made (Cell.inputs), with
OMP_NUM_THREADS = CPU cores // jobs unless it is set: on the 2-core machines two one-thread jobs do more work than
one two-thread job (BENCHMARKS.md). A failing cell stops the sweep with its error once the running cells are
finished, and leaves the finished cells in place; running the benchmark again skips them, resumes an interrupted
training, and redoes an interrupted post-hoc fit (state.py). Several sweeps may share one OUT (say, one per task):
a cell another sweep is running is locked (lock.py); this sweep waits for it and then takes it as that sweep left
it (done, or interrupted).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from ..errors import UqloraError
from ..models import cpu_bf16_warning, pick_device, pick_dtype
from .config import Benchmark
from .lock import CellLock, is_locked, try_lock
from .plan import Cell, plan
from .report import write_report
from .state import DONE, REDO, RESUME, RUN, cell_state, weightless_inputs

# (uqlora arguments, log file, threads: OMP_NUM_THREADS for the cell or None, descriptors the cell's process must
# hold: its lock) -> None; UqloraError on failure
Executor = Callable[[list[str], Path, "int | None", "tuple[int, ...]"], None]
ACTION = {RUN: "running", RESUME: "resuming the interrupted training",
          REDO: "removed the unfinished folder, running again"}
BUSY = "busy"  # the state of a cell another sweep is running
POLL_SECONDS = 10.0  # how often a sweep waiting for another's cells looks at their locks again
_ECHO_LOCK = threading.Lock()


def print_line(text: str) -> None:
    """The default `echo`: one whole line at a time, flushed. The cells' threads report concurrently, and print()
    writes the text and its newline separately (two jobs' lines ran together in a log); flushed, so a sweep's
    output redirected to a file shows each cell as it starts and ends."""
    with _ECHO_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def run_subprocess(argv: list[str], log: Path, threads: int | None = None, keep_fds: tuple[int, ...] = ()) -> None:
    """`python -m uqlora.cli ARGV` in its own process (with OMP_NUM_THREADS=threads if given, inheriting the
    descriptors `keep_fds`), stdout and stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ uqlora {shlex.join(argv)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "uqlora.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              env=env, pass_fds=keep_fds, check=False).returncode
    if code != 0:
        raise UqloraError(f"`uqlora {argv[0]}` exited with status {code}: {_last_error(log)} (output: {log})")


def run_in_process(argv: list[str], log: Path, threads: int | None = None, keep_fds: tuple[int, ...] = ()) -> None:
    """The cell's command in this process (exceptions propagate; nothing is logged; `threads` is not applied; the
    lock stays with this process anyway)."""
    from ..cli import COMMANDS, build_parser

    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def run_benchmark(bench: Benchmark, *, dry_run: bool = False, report_only: bool = False,
                  execute: Executor = run_subprocess, echo: Callable[[str], None] = print_line,
                  part: Benchmark | None = None, jobs: int = 1) -> Path | None:
    """Run what is not done, `jobs` cells at a time (or only list it: dry_run; or only report: report_only);
    returns the report folder. `part` (plan.subset of bench): run and list only its cells; the report is still
    of the whole grid."""
    if jobs < 1:
        raise UqloraError(f"--jobs must be >= 1, got {jobs}")
    cells = plan(part or bench)
    # refuses mismatched runs before anything runs; a cell another sweep runs now is looked at when it is free
    states = [BUSY if is_locked(bench.out, cell_name(cell)) else cell_state(bench, cell) for cell in cells]
    weightless = [] if report_only else weightless_inputs(cells, states)  # the report reads no weights
    if dry_run:
        _print_plan(bench, cells, states, echo)
        _print_weightless(weightless, echo)
        return None
    if weightless:
        needed = sorted({str(run) for _, run in weightless})
        raise UqloraError(f"{len(needed)} finished run(s) hold no weights (copied from an archive of text files?), "
                          f"and cells still to run read them (first: {weightless[0][0].label}): {', '.join(needed)}. "
                          "Remove those folders and run again: the benchmark trains them anew")
    if not report_only:
        todo = [(cell, state) for cell, state in zip(cells, states) if state != DONE]
        at_a_time = f", {jobs} at a time" if jobs > 1 else ""
        echo(f"{bench.path}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run{at_a_time}")
        slow_bf16 = _training_dtype_warning(bench) if todo else None
        if slow_bf16:
            echo(f"warning: {slow_bf16}")
        _run_cells(bench, todo, execute, echo, jobs)
    report = write_report(bench)
    echo(f"report: {report / 'report.md'}")
    return report


def _training_dtype_warning(bench: Benchmark) -> str | None:
    """models.cpu_bf16_warning for the grid's shared `train` dtype and device (each cell's own log has it too,
    but a sweep's user reads this output)."""
    device = pick_device(bench.train.get("device", "auto"))
    return cpu_bf16_warning(device, pick_dtype(bench.train.get("dtype", "auto"), device))


def cell_threads(jobs: int) -> int | None:
    """OMP_NUM_THREADS of each cell: the cores shared out between the jobs; None (torch's default) for one job or
    when the user has set it."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def _run_cells(bench: Benchmark, todo: list[tuple[Cell, str]], execute: Executor, echo, jobs: int) -> None:
    """The cells in plan order, up to `jobs` at once, each once the unfinished runs it reads are made and no other
    sweep holds its lock."""
    # the runs and eval folders still to be made -> the cell that makes them
    makers = {cell.result if cell.step == "evaluate" else cell.run: cell.key for cell, _ in todo}
    finished: set[tuple[str, str]] = set()
    pending = list(enumerate(todo, 1))
    running: dict = {}  # future -> (cell, its lock)
    elsewhere: set[tuple[str, str]] = set()  # cells found locked by another sweep (and said so)
    failure: BaseException | None = None
    threads = cell_threads(jobs)

    def ready(cell: Cell) -> bool:
        return all(makers.get(path, None) in (None, *finished) for path in cell.inputs)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            waiting = False  # for a cell another sweep holds
            if failure is None:
                for item in [it for it in pending if ready(it[1][0])]:
                    if len(running) == jobs:
                        break
                    i, (cell, _) = item
                    prefix = f"[{i}/{len(todo)}]"
                    lock = try_lock(bench.out, cell_name(cell))
                    if lock is None:
                        waiting = True
                        if cell.key not in elsewhere:
                            elsewhere.add(cell.key)
                            echo(f"{prefix} {cell.label}: another sweep is running it; waiting")
                        continue
                    pending.remove(item)
                    try:
                        state = cell_state(bench, cell)  # again: another sweep may have finished or begun it
                    except UqloraError:
                        lock.release()
                        raise
                    if state == DONE:
                        lock.release()
                        finished.add(cell.key)
                        echo(f"{prefix} {cell.label}: done by another sweep")
                        continue
                    future = pool.submit(_run_cell, bench, cell, state, execute, threads, lock, prefix, echo)
                    running[future] = (cell, lock)
            if not running:
                if waiting:
                    time.sleep(POLL_SECONDS)
                    continue
                if failure is None and any(ready(cell) for _, (cell, _) in pending):
                    continue  # cells another sweep finished made more ready
                break  # after a failure: nothing more starts
            done, _ = wait(running, timeout=POLL_SECONDS if waiting else None, return_when=FIRST_COMPLETED)
            for future in done:
                cell, lock = running.pop(future)
                lock.release()
                try:
                    future.result()
                    finished.add(cell.key)
                except (UqloraError, KeyboardInterrupt) as err:  # the running cells finish; nothing else starts
                    failure = failure or err
    if failure is not None:
        raise failure


def _run_cell(bench: Benchmark, cell: Cell, state: str, execute: Executor, threads: int | None, lock: CellLock,
              prefix: str, echo) -> None:
    argv = list(cell.argv)
    if state == RESUME:
        argv = ["train", "--out", str(cell.run), "--resume", "--quiet"]
    elif state == REDO:
        shutil.rmtree(cell.run)
    echo(f"{prefix} {cell.label}: {ACTION[state]}")
    start = time.perf_counter()
    try:
        execute(argv, bench.out / "logs" / log_name(cell), threads, (lock.fd,))
    except UqloraError as err:
        raise UqloraError(f"{cell.label} failed: {err}. The finished cells are kept; `uqlora benchmark "
                          f"{bench.path}` continues from there") from None
    except KeyboardInterrupt:
        echo(f"{prefix} {cell.label}: interrupted; `uqlora benchmark {bench.path}` continues from there")
        raise
    echo(f"{prefix} {cell.label}: done in {time.perf_counter() - start:.1f} s")


def cell_name(cell: Cell) -> str:
    """TASK-RUN-STEP[-EVALFOLDER]: the name of the cell's log (OUT/logs/NAME.log) and lock (OUT/locks/NAME.lock)."""
    name = f"{cell.run.parent.name}-{cell.run.name}-{cell.step}"
    return name + (f"-{cell.result.name}" if cell.result is not None else "")


def log_name(cell: Cell) -> str:
    return cell_name(cell) + ".log"


def _print_weightless(weightless: list[tuple[Cell, Path]], echo) -> None:
    """The dry run's note on each finished run without weights that cells still to run read (state.py)."""
    readers: dict[Path, list[str]] = {}
    for cell, run in weightless:
        readers.setdefault(run, []).append(cell.label)
    for run, labels in readers.items():
        more = ", ..." if len(labels) > 1 else ""
        echo(f"  note: {run} holds no weights, and {len(labels)} cell(s) still to run read it ({labels[0]}{more}): "
             "remove that folder to train it again")


def _print_plan(bench: Benchmark, cells: list[Cell], states: list[str], echo) -> None:
    counts = {s: states.count(s) for s in dict.fromkeys(states)}
    echo(f"{bench.path}: {len(cells)} cells (" + ", ".join(f"{n} {s}" for s, n in counts.items()) +
         f"); runs in {bench.out / 'runs'}")
    for cell, state in zip(cells, states):
        echo(f"  {state:6s}  {cell.label}")
        if state == RESUME:
            echo(f"          uqlora train --out {shlex.quote(str(cell.run))} --resume --quiet")
        elif state == BUSY:
            echo("          (another sweep is running it)")
        elif state != DONE:
            echo(f"          {cell.command}")
