"""benchmarks/scale.py: its measuring of child processes and the decode comparison (the full-scale
run itself is a benchmark, not a test)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


scale = _load_scale()


def test_peak_memory_is_the_childs_own(tmp_path):
    """A child that holds 300 MB for a moment is measured at 300 MB or more, by both measures."""
    script = tmp_path / "hold.py"
    script.write_text("import time\nblock = bytearray(300 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\n"
                      "time.sleep(1.0)\n")
    m = scale.measured([str(script)], program=[sys.executable])
    assert m["peak_rss_tree_mb"] >= 300 and m["peak_rss_largest_process_mb"] >= 300
    light = scale.measured(["score", "--help"])
    assert light["peak_rss_tree_mb"] < 300 and "usage" in light["stdout"] and light["cpu_s"] > 0


def test_a_failing_step_says_which_and_why():
    with pytest.raises(RuntimeError, match="pneumo score"):
        scale.measured(["score", "/nonexistent.csv", "/nonexistent.csv"])


def test_decode_comparison_on_jpeg_files(synth_dir):
    result = scale.measure_decode(synth_dir / "stage_2_train_images", sizes=(64,), limit=4)
    figures = result["sizes"]["64"]
    assert result["files"] == 4 and figures["decoded_side"] == 64
    assert figures["mean_abs_grey_diff"] < 1.0 and figures["speedup"] > 0


def test_full_scale_can_be_refused(capsys):
    assert scale.main(["--skip-full", "--parts", "prepare"]) == 0
    assert "skipped" in capsys.readouterr().err
