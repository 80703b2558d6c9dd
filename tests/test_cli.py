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


def _one_line_error(out, *words):
    """A user's mistake: exit 1 and exactly one stderr line naming it, never a traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("pneumo: error:") and all(w in lines[0] for w in words), lines


def test_careless_paths_and_files_are_one_line_each(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 1 2 3 4\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,1,2,3,4,1\n")
    _one_line_error(_run("score", folder, labels), "folder", "directory")
    _one_line_error(_run("score", sub, folder), "folder", "directory")
    labels.write_text("patientId,x,y,width,height,Target\na,1e,2,3,4,1\n")
    _one_line_error(_run("score", sub, labels), "line 2", "column x", "'1e'")
    labels.write_text("patientId,x,y,width,height,Target\na,1,2,-3,4,1\n")
    _one_line_error(_run("score", sub, labels), "line 2", "positive")
    _one_line_error(_run("train", "--params", folder), "folder", "directory")
    _one_line_error(_run("sweep", folder), "folder", "directory")
    long_name = tmp_path / "long.yaml"
    long_name.write_text(f"name: {'a' * 300}\nruns:\n  - {{epochs: 1}}\n")
    _one_line_error(_run("sweep", long_name), "sweep name", "1 to 100")


def test_a_duplicated_label_row_is_one_box(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,1,2,30,40,1\na,1,2,30,40,1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 1 2 30 40\n")
    out = _run("score", sub, labels, "--json")
    assert out.returncode == 0 and '"map": 1.0' in out.stdout  # a perfect submission scored 0.5


def test_synth_never_writes_into_a_folder_holding_other_data(tmp_path):
    real = tmp_path / "rsna"
    real.mkdir()
    (real / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\nreal,1,2,3,4,1\n")
    _one_line_error(_run("synth", real, "--n-train", "3", "--n-test", "1", "--size", "64"), "holds other data")
    assert "real,1,2,3,4,1" in (real / "stage_2_train_labels.csv").read_text() and len(list(real.iterdir())) == 1
    own = tmp_path / "synth"
    for n in (3, 4):  # its own directory it may write again
        assert _run("synth", own, "--n-train", n, "--n-test", "1", "--size", "64").returncode == 0
