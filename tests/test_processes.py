"""No orphans: a command killed with SIGKILL takes its worker processes with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumo.processes import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc's children lists (no psutil needed)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:  # the task ended while we read
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has let go of everything; its new parent reaps it


def _kill_when_it_has_children(command: list[str], n_children: int, timeout: float = 120) -> set[int]:
    """Start command, SIGKILL it as soon as it has n_children descendants; those pids."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    children: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        children = _descendants(proc.pid)
        if len(children) >= n_children:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before its workers could be seen: {proc.stderr.read().decode()[-500:]}"
    assert len(children) >= n_children, f"only {len(children)} children after {timeout} s"
    time.sleep(0.5)  # let the workers get busy (queues full, work in hand): the hard case
    children |= _descendants(proc.pid)
    proc.kill()
    proc.wait()
    return children


def _left_after(children: set[int], seconds: float = 15) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {pid for pid in children if _alive(pid)}
        if not left:
            return left
        time.sleep(0.1)
    return {pid for pid in children if _alive(pid)}


@pytest.fixture(scope="module")
def many_dicoms(synth_dir, tmp_path_factory):
    """Enough files (the synthetic train images, copied ten times) that workers are still busy."""
    root = tmp_path_factory.mktemp("many")
    shutil.copytree(synth_dir, root / "data")
    train = root / "data" / "stage_2_train_images"
    originals = sorted(train.glob("*.dcm"))
    for copy in range(1, 10):
        for path in originals:
            shutil.copy(path, train / f"{path.stem}-{copy}.dcm")
    return root / "data"


PNEUMO = [sys.executable, "-m", "pneumo"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "validate", "prepare"])
def test_sigkill_leaves_no_child_process(command, many_dicoms, tiny_run, tmp_path):
    args = {
        "predict": ["predict", str(tiny_run), str(many_dicoms / "stage_2_train_images"), "--out",
                    str(tmp_path / "pred"), "--workers", "2", "--batch-size", "4"],
        "validate": ["validate", str(many_dicoms), "--workers", "2"],
        "prepare": ["prepare", str(many_dicoms), "--out", str(tmp_path / "prep"), "--workers", "2",
                    "--image-size", "64"],
    }[command]
    children = _kill_when_it_has_children(PNEUMO + args, n_children=2)
    assert not _left_after(children), f"pneumo {command}: children alive 15 s after its SIGKILL"


def test_a_child_whose_parent_died_before_it_asked_ends_at_once():
    """The race the parent pid closes: the parent dies between the fork and the prctl."""
    code = ("import os, sys; from pneumo.processes import die_with_parent; "
            "die_with_parent(os.getppid() + 10**6); print('survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout


def test_die_with_parent_with_the_right_parent_is_a_no_op():
    die_with_parent(os.getppid(), sig=0)  # signal 0 "clears" the request: this process stays as it was
