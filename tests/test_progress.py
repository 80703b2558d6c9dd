"""pneumo.progress: track()'s bar on a terminal only, and the items unchanged either way; Lightning's
training bar on a terminal or in a Jupyter kernel; none when switched off."""

import os
import subprocess
import sys

import pytest

from pneumo.progress import in_notebook, progress_enabled, track, training_bar_enabled

_CHILD = """
import sys
from pneumo.progress import progress_enabled, track
print("enabled" if progress_enabled() else "disabled", flush=True)
assert list(track(iter(range(5)), 5, "counting")) == [0, 1, 2, 3, 4]
"""


def _on_a_terminal(env) -> str:
    """Run the child with stderr on a real pseudo-terminal; return what reached the terminal."""
    controller, terminal = os.openpty()
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=terminal,
                             env=env, text=True, timeout=60)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # Linux: EIO once the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    assert out.returncode == 0
    return out.stdout.strip() + "\n" + b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_bar_on_a_terminal_only_and_never_when_switched_off():
    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_NO_PROGRESS"}
    shown = _on_a_terminal(env)
    assert shown.startswith("enabled") and "counting" in shown and "5/5" in shown  # done/total
    quiet = _on_a_terminal({**env, "PNEUMO_NO_PROGRESS": "1"})
    assert quiet.startswith("disabled") and "counting" not in quiet


def test_not_a_terminal_means_no_bar_and_the_same_items(capsys):
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    assert list(track((x * x for x in range(4)), 4, "squares")) == [0, 1, 4, 9]
    assert "squares" not in capsys.readouterr().err


def test_track_stops_when_the_caller_stops():
    consumed = []

    def source():
        for i in range(100):
            consumed.append(i)
            yield i

    for item in track(source(), 100, "partial"):
        if item == 2:
            break
    assert consumed == [0, 1, 2]


@pytest.fixture
def kernel(monkeypatch):
    """This process as a Jupyter kernel sees itself: ipykernel imported, IPython's shell with a kernel."""
    import types

    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.delenv("PNEUMO_NO_PROGRESS", raising=False)


def test_the_training_bar_shows_in_a_notebook_unless_switched_off(kernel, monkeypatch):
    assert in_notebook() and training_bar_enabled()
    assert not progress_enabled()  # track()'s rich bars stay terminal-only
    monkeypatch.setenv("PNEUMO_NO_PROGRESS", "1")  # a sweep's run (pneumo.sweeps.runner), tests
    assert not training_bar_enabled()


def test_no_training_bar_in_a_plain_process_without_a_terminal(monkeypatch):
    monkeypatch.delenv("PNEUMO_NO_PROGRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # a script, even one that imported IPython
    assert not in_notebook() and not training_bar_enabled()


@pytest.mark.slow  # starts a real Jupyter kernel
def test_a_real_kernel_is_a_notebook(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cell = "from pneumo.progress import in_notebook, training_bar_enabled\nprint(in_notebook(), training_bar_enabled())"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_NO_PROGRESS"}
    NotebookClient(notebook, kernel_name="python3", timeout=120).execute(env=env)
    assert notebook.cells[0].outputs[0]["text"].strip() == "True True"
