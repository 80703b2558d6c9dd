"""benchmarks/gpu.py: the GPU check's own smoke run on the CPU (the GPU figures themselves are a
benchmark, not a test), and its refusal to run for real without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("device", "data", "profile", "prepare", "train", "forward", "predictor", "predict_folder")


def test_without_a_gpu_it_asks_for_smoke(monkeypatch, capsys):
    import runpy

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    assert runpy.run_path(str(ROOT / "benchmarks" / "gpu.py"), run_name="bench_gpu")["main"]([]) == 2
    assert capsys.readouterr().err.strip() == "gpu: no CUDA device; run with --smoke to test the script on the CPU"


@pytest.mark.slow  # makes data, trains an epoch and predicts (about a minute on 2 cores)
def test_smoke_run_reports_every_stage(tmp_path):
    env = {**os.environ, "PNEUMO_OUTPUTS": str(tmp_path), "PNEUMO_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "gpu", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "gpu.json").read_text())
    assert result["benchmark"] == "gpu" and result["smoke"] and result["errors"] == []
    stages = result["stages"]
    assert set(STAGES) <= set(stages) and all(stages[name]["ok"] for name in STAGES)
    assert stages["device"]["device"] == result["device"]
    assert stages["train"]["epochs_done"] == 1 and stages["train"]["train_images_per_s"] > 0
    assert set(stages["forward"]["sizes"]) == {"64", "128"}
    assert stages["predictor"]["images_per_s"] > 0 and stages["predict_folder"]["images"] == 4
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == result  # printed as written
