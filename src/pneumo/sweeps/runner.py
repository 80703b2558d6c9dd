"""One run's execution: the training notebook under papermill in its own process, writing into
its run directory; what it leaves there (process record, failure) is the executors' result."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pneumo.io import atomic_write_text
from pneumo.processes import terminate_with_parent
from pneumo.sweeps.slots import Slot
from pneumo.training.rundir import RunDir

_EXCEPTION_LINE = re.compile(r"^[A-Z][\w.]*(Error|Exception|Diverged|Interrupt|Exit)\w*: .+")
# A kernel that never came up (papermill issues 239 and 511: a port taken between choosing and
# binding, a start timeout on a loaded machine): the run is started again, at most this often.
KERNEL_START_ATTEMPTS = 3
_KERNEL_START_FAILED = re.compile(r"Kernel died before replying to kernel_info|Kernel didn't respond in \d+ seconds"
                                  r"|Address already in use|Kernel failed to start|kernel_info_reply")
_CELL_STARTED = "Executing Cell "  # papermill's --log-output line as each cell starts


def papermill_command(notebook: Path, run_dir: RunDir, start_timeout: int = 300) -> list[str]:
    return [sys.executable, "-m", "papermill", str(notebook), str(run_dir.notebook),
            "-f", str(run_dir.papermill_params), "-k", "python3", "--cwd", str(run_dir.path), "--no-progress-bar",
            "--log-output", "--start-timeout", str(start_timeout)]


def execute_run(notebook: Path, run, run_dir: RunDir, slot: Slot | None, stop: threading.Event) -> dict:
    """One papermill execution of run (a sweep.Run: name, params); returns its record and never
    raises for the run's own errors. slot None: the process keeps this one's devices and threads
    (a Dask GPU worker started with its own CUDA_VISIBLE_DEVICES)."""
    if run_dir.ended():  # trained to its end by a process killed before it was told (a search's
        # trial enqueued again as stale): its record, from what it wrote; training again would refuse
        state = "done" if run_dir.finished() else "pruned"
        return {"run": run.name, "state": state, "seconds": 0.0, "reused": True}
    run_dir.start_execution()
    params = dict(run.params)
    if slot is not None and not params.get("threads"):
        params["threads"] = slot.threads
    params["run_dir"] = str(run_dir.path)
    import yaml

    atomic_write_text(run_dir.papermill_params, yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **(slot.environment() if slot else {}), "PNEUMO_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    env["PNEUMO_OUTPUTS"] = str(run_dir.path.parents[2].resolve())  # <out>/runs/<sweep>/<run>: caches in <out>/data
    env.update(getattr(run, "env", None) or {})  # a search trial: where its study is
    start = time.perf_counter()
    for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
        offset = run_dir.log.stat().st_size if run_dir.log.is_file() else 0
        returncode = _papermill(notebook, run, run_dir, env, stop)
        if returncode is None:
            return {"run": run.name, "state": "interrupted", "seconds": time.perf_counter() - start}
        if returncode == 0 or not _kernel_did_not_start(run_dir.log, offset) or attempt == KERNEL_START_ATTEMPTS:
            break
        with open(run_dir.log, "a") as logfile:
            logfile.write(f"=== the kernel did not start (attempt {attempt} of {KERNEL_START_ATTEMPTS}); "
                          "starting again\n")
    seconds = time.perf_counter() - start
    run_dir.write_process(seconds, returncode, kernel_starts=attempt)
    if returncode == 0 and run_dir.ended():
        return {"run": run.name, "state": run_dir.state(), "seconds": seconds}
    error = _last_error(run_dir.log)
    if "DeadKernelError" in error:
        error = f"the kernel was killed (out of memory, or a signal such as SIGKILL) while running: {error}"
    elif _kernel_did_not_start(run_dir.log, offset):
        error = f"the kernel did not start in {attempt} attempts: {error}"
    run_dir.mark_failed(error, returncode=returncode, notebook=str(run_dir.notebook))
    return {"run": run.name, "state": "failed", "seconds": seconds, "error": error}


def _papermill(notebook: Path, run, run_dir: RunDir, env: dict, stop: threading.Event) -> int | None:
    """One papermill process; its return code, None when stopped."""
    with open(run_dir.log, "ab") as logfile:
        logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} papermill {run.name} "
                      f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r})\n".encode())
        logfile.flush()
        # own session: Ctrl-C in the terminal reaches the sweep, which stops the runs itself
        proc = subprocess.Popen(papermill_command(notebook, run_dir), stdout=logfile,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=terminate_with_parent)
        if _wait_or_stop(proc, stop):
            return None
    return proc.returncode


def _kernel_did_not_start(log_path: Path, offset: int) -> bool:
    """This attempt's log (from offset) says the kernel never came up and no cell ran."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return _CELL_STARTED not in text and bool(_KERNEL_START_FAILED.search(text))


def _wait_or_stop(proc: subprocess.Popen, stop: threading.Event) -> bool:
    """Wait for proc; when stop is set first, end its process group (TERM, then KILL) and return True."""
    while proc.poll() is None:
        if stop.wait(0.5):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return True
    return False


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed run's log: the last 'SomeError: message' line (the
    run's own exception, which papermill's traceback repeats at the end)."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    for line in reversed(lines):
        text = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # tracebacks from the kernel are coloured
        if _EXCEPTION_LINE.match(text) and not text.startswith("PapermillExecutionError"):
            return text[-500:]
    return lines[-1].strip()[-500:] if lines else "no output"
