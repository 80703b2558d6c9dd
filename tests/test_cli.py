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


def _parsers():
    """(name, parser) for pneumo itself and every subcommand."""
    import argparse

    from pneumo.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [("pneumo", parser), *commands.choices.items()]


def test_every_argument_of_every_command_has_help_and_no_none_default():
    import argparse

    missing = [f"{name} {action.dest}" for name, parser in _parsers() for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, missing
    (_, top), *commands = _parsers()
    (listed,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(choice.help for choice in listed._choices_actions)  # each command's line in `pneumo --help`
    for name, parser in commands:
        text = parser.format_help()
        assert "None" not in text and "default: False" not in text, (name, text)
    synth = " ".join(dict(commands)["synth"].format_help().split())  # unwrapped
    assert "(default: 400)" in synth and "(default: 1024)" in synth


def test_version():
    import pneumo

    out = _run("--version")
    assert out.returncode == 0 and out.stdout == f"pneumo {pneumo.__version__}\n", out


def test_params_lists_every_training_parameter(capsys):
    import json

    from pneumo.cli import main
    from pneumo.config import TrainConfig
    from pneumo.models.heads import HEADS
    from pneumo.optimizers import OPTIMIZERS

    assert main(["params"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(lines) == TrainConfig.names()
    default = TrainConfig()
    assert lines["optimizer"].split()[2] == default.optimizer and all(o in lines["optimizer"] for o in OPTIMIZERS)
    assert lines["epochs"].split()[1:] == ["int", str(default.epochs)]
    assert lines["lr"].split()[1:] == ["float", "or", "null", "null"]
    assert lines["augment"].split()[1:] == ["bool", "true"]

    assert main(["params", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == TrainConfig.names()
    assert {r["name"]: r["default"] for r in rows} == default.to_dict()
    by_name = {r["name"]: r for r in rows}
    assert by_name["optimizer"]["choices"] == list(OPTIMIZERS) and by_name["data_dir"]["choices"] is None
    heads = by_name["head"]["choices"]
    assert default.head in heads and all(HEADS.get(h).decodes_boxes for h in heads)
    assert by_name["threshold"]["type"] == "float" and by_name["augment"]["type"] == "bool"


def test_train_help_points_to_params():
    out = _run("train", "--help")
    assert out.returncode == 0 and "`pneumo params`" in out.stdout and "-p lr=" in out.stdout
    assert "max_time" in out.stdout.split("lists their types")[1]  # the epilog names the parameters too


def test_data_dir_option_works_like_the_positional(tmp_path):
    from pneumo.cli import build_parser

    small = ["--n-train", "4", "--n-test", "2", "--size", "64"]
    assert _run("synth", tmp_path / "a", *small).returncode == 0
    out = _run("synth", "--data-dir", tmp_path / "b", *small)
    assert out.returncode == 0 and f"DICOMs to {tmp_path / 'b'}" in out.stdout, out.stderr
    labels = "stage_2_train_labels.csv"
    assert (tmp_path / "a" / labels).read_text() == (tmp_path / "b" / labels).read_text()
    out = _run("validate", "--data-dir", tmp_path / "b")
    assert out.returncode == 0 and "4 usable labelled train images" in out.stdout, out.stderr
    for command in ("synth", "validate", "prepare"):
        args = build_parser().parse_args([command, "--data-dir", "x"])
        assert (args.dir, str(args.data_dir)) == (None, "x")


def test_data_dir_twice_or_never_is_one_usage_error(tmp_path, capsys):
    import pytest

    from pneumo.cli import main

    out = _run("synth", tmp_path / "a", "--data-dir", tmp_path / "b")
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert out.returncode == 2 and len(errors) == 1 and "--data-dir" in errors[0] and "DIR" in errors[0], out.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for argv in (["validate", "a", "--data-dir", "b"], ["prepare", "--data-dir", "b", "a"], ["prepare"], ["synth"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert exit_.value.code == 2 and len(errors) == 1 and "--data-dir" in errors[0], (argv, errors)


def test_synth_refuses_a_size_below_its_minimum(tmp_path):
    out = _run("synth", tmp_path / "d", "--size", "32")
    assert out.returncode == 2 and "must be at least 64" in out.stderr and "Traceback" not in out.stderr


def _run_limited(args, file_size_limit: int):
    """pneumo with the file size limit set (a full disk as the writer sees it: EFBIG)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "pneumo", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)


def test_a_full_disk_or_a_forbidden_folder_is_one_line(tmp_path):
    out = _run_limited(["synth", tmp_path / "d", "--n-train", "4", "--n-test", "1", "--size", "256",
                        "--workers", "1"], file_size_limit=4096)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"pneumo: error: {tmp_path / 'd'}/stage_2_train_images/")
    assert ".dcm: File too large" in lines[0] and "re-run resumes" in lines[0]
    out = subprocess.run([sys.executable, "-m", "pneumo", "synth", "/sys/pneumo-test", "--n-train", "2"],
                         capture_output=True, text=True)  # sysfs refuses a new folder, even to root
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "/sys/pneumo-test" in lines[0], out.stderr[-2000:]


def test_synth_sizes_are_bounded(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pneumo", "synth", str(tmp_path / "d"), "--size", "100000"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "must be at most 4096" in out.stderr
