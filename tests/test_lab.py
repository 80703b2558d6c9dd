"""The three notebooks in a real JupyterLab, driven by headless Chromium the way a person uses them.

A JupyterLab server from this environment (127.0.0.1, a free port, a random token, its settings,
workspaces and kernels in a temporary directory so a user's own JupyterLab state is untouched)
serves a copy of the project's layout: notebooks/ and outputs/synth (pneumo.data.synth), so the
notebooks' own relative paths find the data. Debian's Chromium (never a downloaded browser)
runs all cells of 01-explore, 02-train (one epoch, set in its parameters cell) and 03-predict,
and the test checks what a person would see. Screenshots: outputs/lab-screens/.
Without Chromium or Playwright the test skips; in CI (CI set) it fails instead: .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENS = ROOT / "outputs" / "lab-screens"
# the one-epoch run of 02-train: its parameters cell, as a person would edit it
TRAIN_PARAMETERS = {"epochs": 1, "image_size": 64, "width": 4, "depth": 3, "batch_size": 8, "n_val_images": 4}
VIEWPORT = {"width": 1400, "height": 1000}


def _set_parameters(path: Path, values: dict) -> None:
    """Edit the literals of the notebook's parameters cell (what a person types there)."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name, value in values.items():
        cell.source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", cell.source, flags=re.M)
        assert n == 1, f"{path.name}: no parameter {name}"
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def project(synth_dir, tmp_path_factory):
    """The project's layout around a copy of the notebooks: their default paths find outputs/synth."""
    root = tmp_path_factory.mktemp("lab-project")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    shutil.copytree(synth_dir, root / "outputs" / "synth")
    _set_parameters(root / "notebooks" / "02-train.ipynb", TRAIN_PARAMETERS)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_environment(state: Path) -> dict:
    """Jupyter's config, data (kernels), runtime and IPython dirs in `state`: a user's are not read or written."""
    env = {k: v for k, v in os.environ.items() if k not in ("PNEUMO_OUTPUTS", "PNEUMO_NO_PROGRESS")}
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env[name] = str(state / name.lower())
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    settings = state / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no news consent pop-up over the notebook, no update check (and no request leaving the machine)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return env


@pytest.fixture(scope="module")
def lab(sync_playwright, project):  # the skip comes first, before any data is made
    """A JupyterLab server on the project copy: yields (base url, token)."""
    state = project / ".lab-state"
    state.mkdir()
    env = _lab_environment(state)
    port, token = _free_port(), secrets.token_hex(16)
    log = (state / "lab.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={project}",
         f"--LabApp.user_settings_dir={state / 'settings'}", f"--LabApp.workspaces_dir={state / 'workspaces'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=",
         "--LabApp.extension_manager=readonly", "--allow-root"],
        cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(server, f"{url}/api/status?token={token}", state / "lab.log")
        yield url, token
    finally:
        server.send_signal(signal.SIGINT)  # JupyterLab shuts its kernels down on SIGINT (twice: no prompt)
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _wait_for_server(server, status_url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(status_url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# ---- driving JupyterLab as a person does --------------------------------------------------------

def _open(page, lab, name: str):
    """Open notebooks/<name> alone (?reset: no tabs restored from before) once its kernel is idle."""
    url, token = lab
    page.goto(f"{url}/lab/tree/notebooks/{name}?reset&token={token}")
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-CodeCell").first.wait_for(timeout=90_000)
    _wait_idle(page)
    return panel


def _wait_idle(page, timeout: float = 120_000) -> None:
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=timeout)


def _run_all(page, panel, timeout: float, while_running=None) -> None:
    """Run > Run All Cells, then wait until every code cell has its execution number
    (while_running(page, panel) is called in between, as the cells run)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    if while_running is not None:
        while_running(page, panel)
    page.wait_for_function(
        """() => { const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => p.checkVisibility());
                   const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                                       .map(e => e.textContent.trim());
                   return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t)); }""",
        timeout=timeout, polling=500)
    _wait_idle(page)


def _save(page) -> None:
    """File > Save Notebook (Ctrl+S), then wait until the tab is no longer marked modified."""
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Save Notebook(?! As)")).click()  # its name ends in Ctrl+S
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
                           timeout=30_000)


def _shut_down_kernels(lab) -> None:
    """Free the CPU and memory of a finished notebook's kernel before the next one starts."""
    url, token = lab
    with urllib.request.urlopen(f"{url}/api/kernels?token={token}") as response:
        kernels = json.load(response)
    for kernel in kernels:
        request = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(request).close()


def _check_outputs(panel, stem: str, min_images: int) -> None:
    """What a person checks first: no traceback or stderr text, every figure drawn and readable."""
    errors = panel.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    assert errors.count() == 0, f"{stem}: error output in the browser:\n" + "\n".join(errors.all_inner_texts())[:3000]
    assert panel.get_by_text("Error displaying widget").count() == 0, f"{stem}: a widget failed to display"
    images = panel.locator(".jp-OutputArea-output img").evaluate_all(
        "imgs => imgs.map(i => ({complete: i.complete, natural: i.naturalWidth, "
        "shown: i.getBoundingClientRect().width}))")
    assert len(images) >= min_images, f"{stem}: {len(images)} images shown, expected {min_images}"
    for i, image in enumerate(images):
        assert image["complete"] and image["natural"] > 0, f"{stem}: image {i} not rendered"
        # a figure wider than the notebook is shrunk by the browser, and its text with it
        assert image["shown"] >= 0.85 * image["natural"], \
            f"{stem}: image {i} shrunk to {image['shown']:.0f} of {image['natural']} px"


def _screenshot_cells(panel, stem: str) -> None:
    cells = panel.locator(".jp-CodeCell")
    for i in range(cells.count()):
        cells.nth(i).screenshot(path=SCREENS / f"{stem}-cell{i}.png")


def _viewer_image(viewer) -> str:
    return viewer.locator("img").first.get_attribute("src")


def _changes_image(page, viewer, action, what: str, stem: str) -> str:
    """Do one thing to the viewer's controls; the image it shows must change (the PNG data differs)."""
    before = _viewer_image(viewer)
    action()
    try:
        page.wait_for_function(
            "([root, before]) => { const img = root.querySelector('img'); return img && img.src !== before; }",
            arg=[viewer.element_handle(), before], timeout=30_000, polling=200)
    except Exception as exc:  # Playwright's TimeoutError: say which control did nothing
        raise AssertionError(f"{stem}: changing the viewer's {what} did not change the image") from exc
    viewer.locator("img").first.evaluate("i => i.decode()")
    viewer.screenshot(path=SCREENS / f"{stem}-viewer-{what.replace(' ', '-')}.png")
    return _viewer_image(viewer)


def _slider(viewer, label: str):
    return viewer.locator(".widget-hslider").filter(has=viewer.page.locator("label", has_text=label))


def _type_in_readout(page, slider, value: int) -> None:
    """A slider's number is editable: select it, type a value, Enter (as people set a window exactly)."""
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+a")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


def _use_viewer(page, panel, stem: str) -> None:
    """Every control of the explore viewer changes what it shows: class, patient, level, width, boxes."""
    viewer = panel.locator(".widget-vbox").first
    viewer.locator("img").first.wait_for(timeout=60_000)
    for control in (".widget-dropdown select", ".widget-checkbox input"):
        assert viewer.locator(control).count() == 1, f"{stem}: viewer control {control} missing"
    assert viewer.locator(".widget-hslider").count() == 3, f"{stem}: the patient, level and width sliders"
    label = viewer.locator(".widget-label").last
    first_patient = label.inner_text()
    _changes_image(page, viewer, lambda: viewer.locator(".widget-checkbox input").click(), "boxes off", stem)
    _changes_image(page, viewer, lambda: viewer.locator(".widget-checkbox input").click(), "boxes on", stem)
    classes = viewer.locator(".widget-dropdown select option").all_text_contents()
    _changes_image(page, viewer,
                   lambda: viewer.locator(".widget-dropdown select").select_option(index=len(classes) - 1),
                   "class", stem)
    assert label.inner_text() != first_patient, f"{stem}: the patient line did not follow the class"
    handle = _slider(viewer, "patient").locator(".noUi-handle")
    _changes_image(page, viewer, lambda: (handle.focus(), page.keyboard.press("ArrowRight")), "patient", stem)
    _changes_image(page, viewer, lambda: _type_in_readout(page, _slider(viewer, "level"), 60), "level", stem)
    _changes_image(page, viewer, lambda: _type_in_readout(page, _slider(viewer, "width"), 90), "width", stem)
    assert _slider(viewer, "level").locator(".widget-readout").inner_text() == "60"


def _viewer_cell(panel):
    return panel.locator(".jp-CodeCell").filter(has=panel.page.locator(".widget-vbox")).first


def _explore(page, lab) -> None:
    panel = _open(page, lab, "01-explore.ipynb")
    _run_all(page, panel, timeout=240_000)
    _screenshot_cells(panel, "01-explore")
    _check_outputs(panel, "01-explore", min_images=3)  # overview figure, samples grid, the viewer's image
    shown = _viewer_cell(panel).locator(".jp-OutputArea-output img")
    assert shown.count() == 1, \
        f"01-explore: the viewer cell shows {shown.count()} images (a still copy beside the live one?)"
    _use_viewer(page, panel, "01-explore")
    # saved, the viewer outlives a page reload (its widgets come back from the live kernel) ...
    _save(page)
    page.reload()
    panel = page.locator(".jp-NotebookPanel:visible")
    viewer = _viewer_cell(panel).locator(".widget-vbox").first
    viewer.locator("img").first.wait_for(timeout=60_000)
    _changes_image(page, viewer, lambda: _type_in_readout(page, _slider(viewer, "level"), 200),
                   "level after reload", "01-explore")
    # ... and a second Run All: a fresh viewer that works like the first
    _run_all(page, panel, timeout=240_000)
    _check_outputs(panel, "01-explore (run again)", min_images=3)
    _use_viewer(page, panel, "01-explore-rerun")


def _train(page, lab, project: Path) -> Path:
    panel = _open(page, lab, "02-train.ipynb")
    _run_all(page, panel, timeout=480_000, while_running=_training_shows_progress)
    _screenshot_cells(panel, "02-train")
    _check_outputs(panel, "02-train", min_images=2)  # learning curves, validation predictions
    runs = sorted((project / "outputs" / "runs" / "train").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file(), runs
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert len(metrics["history"]) == TRAIN_PARAMETERS["epochs"]
    assert panel.locator(".jp-OutputArea-output").get_by_text("best val mAP").count() == 1
    return runs[0]


def _training_shows_progress(page, panel) -> None:
    """Mid-training, a person sees which device trains and a live progress bar (Lightning's rich
    bar, rendered in the cell as it advances: "Epoch 0/0 ━━━ 5/5 ... train/loss"), not a silent cell."""
    outputs = panel.locator(".jp-OutputArea-output")
    outputs.get_by_text(re.compile(r"training on (cpu|gpu|cuda)", re.I)).first.wait_for(timeout=240_000)
    outputs.get_by_text(re.compile(r"Epoch \d+/\d+")).first.wait_for(timeout=240_000)
    page.screenshot(path=SCREENS / "02-train-mid-training.png", full_page=True)


def _predict(page, lab, project: Path, run: Path) -> None:
    _set_parameters(project / "notebooks" / "03-predict.ipynb", {"model": f"../outputs/runs/train/{run.name}"})
    panel = _open(page, lab, "03-predict.ipynb")
    _run_all(page, panel, timeout=240_000)
    _screenshot_cells(panel, "03-predict")
    _check_outputs(panel, "03-predict", min_images=1)  # the annotated images
    assert panel.locator(".jp-OutputArea-output").get_by_text("PredictionString").count() == 1, "the submission table"
    assert (project / "outputs" / "predictions" / "notebook" / "submission.csv").is_file()


def test_notebooks_in_jupyterlab(lab, browser, project):
    """01-explore, 02-train (one epoch), 03-predict (that run's model): all cells, as a person runs them."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    for old in SCREENS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    page = browser.new_page(viewport=VIEWPORT)
    try:
        _explore(page, lab)
        _shut_down_kernels(lab)
        run = _train(page, lab, project)
        _shut_down_kernels(lab)
        _predict(page, lab, project, run)
    except BaseException:
        page.screenshot(path=SCREENS / "failure.png")
        raise
    finally:
        page.close()
