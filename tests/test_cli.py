import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pneumo", *map(str, args)], capture_output=True, text=True)


def test_light_commands_do_not_import_torch(tmp_path):
    d = tmp_path / "s"
    code = f"""
import sys
from pneumo.cli import main
assert main(["synth", "{d}", "--n-train", "4", "--n-test", "2", "--size", "64"]) == 0
assert main(["validate", "{d}"]) == 0
assert main(["prepare", "{d}", "--out", "{tmp_path / 'p'}", "--image-size", "32"]) == 0
main(["score", "{d}/stage_2_sample_submission.csv", "{d}/stage_2_test_labels.csv"])
assert "torch" not in sys.modules, "torch was imported"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_synth_command_and_bad_arguments(tmp_path):
    out = _run("synth", tmp_path / "d", "--n-train", "3", "--n-test", "1", "--size", "64")
    assert out.returncode == 0 and "wrote 3 train" in out.stdout
    out = _run("synth", tmp_path / "d", "--n-train", "0")
    assert out.returncode == 2 and "must be at least 1" in out.stderr


def test_prepare_command(synth_dir, tmp_path):
    out = _run("prepare", synth_dir, "--out", tmp_path / "p", "--image-size", "32")
    assert out.returncode == 0, out.stderr
    assert "48 images (0 skipped" in out.stdout and (tmp_path / "p" / "manifest.json").is_file()


def test_help_opens_with_a_whole_sentence():
    out = _run("--help")
    description = out.stdout.split("\n\n")[1]
    assert out.returncode == 0 and description.strip().endswith(".") and "so that" not in description


def test_prepare_defaults_are_the_training_defaults():
    # a default `pneumo prepare DIR` must make the cache a default `pneumo train --data-dir CACHE` reads
    from pneumo.cli import build_parser
    from pneumo.config import TrainConfig

    args = build_parser().parse_args(["prepare", "d"])
    default = TrainConfig()
    assert (args.image_size, args.val_fraction, args.seed) == (default.image_size, default.val_fraction, default.seed)
