"""The pneumo command line: synthetic data, validation, training, sweeps, prediction and scoring.

Each command imports what it needs when it runs, so that `score`, `validate` and `synth` start
without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import types
import typing
from pathlib import Path

from pneumo import __version__
from pneumo.errors import PneumoError

log = logging.getLogger("pneumo")


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text}: must be at most {maximum}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


_positive_int = _int_at_least(1)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults that say something: not None (the help says what happens then), not a
    flag's False, not one the help already states; descriptions and epilogs keep their lines."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _data_dir(args) -> Path:
    """The data folder, given as the positional DIR or as --data-dir (argparse refuses both and neither)."""
    return args.dir if args.dir is not None else args.data_dir


def cmd_synth(args) -> int:
    from pneumo.data.synth import make_dataset

    folder = _data_dir(args)
    result = make_dataset(folder, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                          size=args.size, workers=args.workers)
    counts = ", ".join(f"{v} {k}" for k, v in result["classes"].items())
    print(f"wrote {result['train']} train ({counts}) and {result['test']} test DICOMs to {folder}")
    return 0


def cmd_validate(args) -> int:
    from pneumo.data.validate import validate

    folder = _data_dir(args)
    report = validate(folder, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            print(f"{p.severity:7}  {p.problem:24}  {p.patientId or '-':38}  {p.detail}  [{p.path}]")
        counts = report.to_dict()["counts"]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no problems"
        print(f"{report.n_train_images} train and {report.n_test_images} test files, "
              f"{report.n_usable_train} usable labelled train images; {summary}")
    if not report.usable:
        print(f"pneumo: error: {folder}: not usable: {report.fatal}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args) -> int:
    from pneumo.data.prepare import prepare
    from pneumo.sweeps.cluster import close, dask_client

    client, cluster = dask_client(args.cluster, cluster_file=args.cluster_file) if args.cluster else (None, None)
    try:
        prepared = prepare(_data_dir(args), out=args.out, image_size=args.image_size, val_fraction=args.val_fraction,
                           seed=args.seed, workers=args.workers, force=args.force, client=client)
    finally:
        close(client, cluster)
    m = prepared.manifest
    print(f"{m['n_images']} images ({m['n_skipped']} skipped, listed in skipped.csv) at "
          f"{m['image_size']} px in {prepared.root}")
    return 0


def cmd_score(args) -> int:
    from pneumo.data.submission import score_files

    score = score_files(args.submission, args.labels)
    if args.json:
        print(json.dumps(score.to_dict(per_image=args.per_image), indent=2))
    else:
        thresholds = "  ".join(f"{t}: {v:.4f}" for t, v in score.per_threshold.items())
        print(f"mAP {score.map:.4f} over {score.n_images} images\n{thresholds}")
    return 0


def cmd_train(args) -> int:
    from pneumo.config import load_config, parse_overrides
    from pneumo.training.fit import fit, tensorboard_command

    overrides = parse_overrides(args.p)
    if args.data_dir:
        overrides.setdefault("data_dir", str(args.data_dir))
    config = load_config(args.params, overrides)
    metrics = fit(config, args.out)
    print(f"run: {metrics['run_dir']}\nbest val mAP {metrics['best_val_map']:.4f} at epoch "
          f"{metrics['best_epoch']} (threshold {metrics['threshold']:.2f}, {metrics['epochs_done']} epochs, "
          f"{metrics['wall_time_s']:.0f} s)\n{tensorboard_command(metrics['run_dir'])}")
    return 0


def cmd_sweep(args) -> int:
    from pneumo.sweeps.sweep import load_sweep, sweep
    from pneumo.training.rundir import RunDir

    if args.print_name:  # for scripts (the noxfile): the directory name the sweep's outputs go under
        print(load_sweep(args.params, data_dir=args.data_dir).name)  # other data: another name
        return 0
    result = sweep(args.params, out=args.out, data_dir=args.data_dir, max_parallel=args.max_parallel,
                   resume=args.resume, marathon=args.marathon, cluster=args.cluster, cluster_file=args.cluster_file,
                   storage=args.storage)
    print(f"summary: {result['summary']}\ncompare runs: tensorboard --logdir {result['runs_dir']}")
    if result.get("model"):
        print(f"model: {result['model']} (marathon val mAP {result['marathon_val_map']:.4f})")
    if result["failed"]:
        first = RunDir(Path(result["runs_dir"]) / result["failed"][0])
        # a search's failed trials stay failed in its study (Optuna's model): --resume goes on to
        # the trials still to run, it does not run those again
        then = ("a search keeps failed trials failed; --resume runs its remaining trials" if result.get("search")
                else "then run again with --resume")
        print(f"pneumo: error: {len(result['failed'])} run(s) not finished: {', '.join(result['failed'])}; "
              f"see their {first.log.name} and {first.notebook.name} (e.g. {first.log}); {then}", file=sys.stderr)
        return 1
    return 0


def cmd_predict(args) -> int:
    from pneumo.deploy.predict import predict_folder

    summary = predict_folder(args.model, args.images_dir, args.out, threshold=args.threshold,
                             min_box_area=args.min_box_area, tta=args.tta, labels=args.labels,
                             batch_size=args.batch_size, workers=args.workers, images=args.images,
                             dicom_sr=args.dicom_sr, dicom_gsps=args.dicom_gsps)
    rate = f", {summary['images_per_second']:.1f} images/s" if summary["images_per_second"] else ""
    print(f"{summary['n_predicted']} predicted ({summary['n_with_boxes']} with boxes), {summary['n_errors']} errors "
          f"(errors.csv){rate}; outputs in {summary['out']}")
    if "map" in summary:
        print(f"mAP {summary['map']:.4f} over {summary['n_scored']} scored images (score.json)")
    if "n_reports" in summary:
        print(f"{summary['n_reports']} DICOM files written (sr/, gsps/), "
              f"{summary['n_warnings']} warnings (warnings.csv)")
    return 0


def cmd_serve(args) -> int:
    from pneumo.deploy.serve import serve

    serve(args.model, host=args.host, port=args.port, threshold=args.threshold, min_box_area=args.min_box_area)
    return 0


def cmd_params(args) -> int:
    from pneumo.models.heads import HEADS  # imports torch: the heads register themselves on import

    rows = train_parameters([n for n in HEADS.names() if HEADS.get(n).decodes_boxes])  # the box heads
    print(json.dumps(rows, indent=2) if args.json else format_parameters(rows))
    return 0


def _type_name(hint) -> str:
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)  # config's own wording


def train_parameters(head_names) -> list[dict]:
    """TrainConfig's fields as [{name, type, default, choices}]; choices: the accepted values, a
    sentence where the set is open (encoder), None where the config does not restrict the value."""
    from pneumo.config import LOSSES, POSTPROCESS, PRECISIONS, TrainConfig
    from pneumo.optimizers import OPTIMIZERS, SCHEDULERS

    choices = {"optimizer": list(OPTIMIZERS), "scheduler": list(SCHEDULERS), "loss": list(LOSSES),
               "postprocess": list(POSTPROCESS), "precision": list(PRECISIONS), "head": list(head_names),
               "encoder": "unet or a timm model name"}
    hints = typing.get_type_hints(TrainConfig)
    return [{"name": f.name, "type": _type_name(hints[f.name]),
             "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
             "choices": choices.get(f.name)} for f in dataclasses.fields(TrainConfig)]


def _cell(value) -> str:
    """A value as `-p key=value` takes it (null, true, 0.0001); a list of choices comma-separated."""
    if isinstance(value, str):
        return value
    return ", ".join(value) if isinstance(value, list) else json.dumps(value)


def format_parameters(rows) -> str:
    """A header, then one parameter a line in columns: name, type, default, choices."""
    table = [("name", "type", "default", "choices")]
    table += [(r["name"], r["type"], _cell(r["default"]), "" if r["choices"] is None else _cell(r["choices"]))
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]).rstrip() for row in table)


def _add_cluster_options(parser, verb: str) -> None:
    parser.add_argument("--cluster", default=None, metavar="WHERE",
                        help=f"{verb} on Dask: 'local', 'slurm', 'htcondor', 'pbs' (params/cluster/<kind>.yaml) "
                             "or a scheduler address (default: here, without Dask)")
    parser.add_argument("--cluster-file", type=Path, default=None, metavar="FILE",
                        help="cluster YAML (default params/cluster/<kind>.yaml)")


def _add_data_dir(parser, what: str) -> None:
    """The data folder: a positional DIR, or --data-dir DIR as train and sweep spell it; one of them."""
    either = parser.add_mutually_exclusive_group(required=True)
    either.add_argument("dir", type=Path, nargs="?", metavar="DIR", help=f"{what} (or --data-dir DIR)")
    either.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help="the same as DIR: give one of them")


def _workers_option(parser, default: str = "one per CPU core") -> None:
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help=f"processes (default: {default})")


def _add_model_options(parser) -> None:
    """The model and its box settings, for predict and serve."""
    parser.add_argument("model", type=Path, metavar="MODEL", help="run dir, model dir (outputs/models/<name>[/vN]) "
                        "or .ckpt file")
    parser.add_argument("--threshold", type=float, default=None, metavar="P",
                        help="box probability threshold (default: the model's)")
    parser.add_argument("--min-box-area", type=float, default=None, metavar="PX",
                        help="smallest box kept, in pixels of the original image (default: the model's)")


def _train_epilog() -> str:
    import textwrap

    from pneumo.config import TrainConfig  # imports no torch

    names = textwrap.fill(", ".join(TrainConfig.names()), width=78, initial_indent="  ", subsequent_indent="  ")
    return ("training parameters (`pneumo params` lists their types, defaults and choices):\n"
            f"{names}\n\nexamples:\n"
            "  pneumo train --data-dir outputs/synth -p epochs=2 -p image_size=64\n"
            "  pneumo train --params params/real-cpu.yaml -p optimizer=sgd -p lr=0.01\n"
            "  (-p values are YAML: -p lr=null, -p augment=false)")


def build_parser() -> argparse.ArgumentParser:
    # pneumo.config imports no torch; prepare's defaults are the training defaults
    from pneumo.config import TrainConfig

    parser = argparse.ArgumentParser(prog="pneumo", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print pneumo's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`pneumo COMMAND --help` tells its arguments")

    def command(name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                              formatter_class=_HelpFormatter, **kwargs)

    p = command("synth", "write a synthetic RSNA-layout dataset")
    _add_data_dir(p, "folder to write into: new, empty, or one synth wrote")
    p.add_argument("--n-train", type=_int_at_least(1, 100_000), default=400, metavar="N",
                   help="labelled training images")
    p.add_argument("--n-test", type=_int_at_least(1, 100_000), default=60, metavar="N",
                   help="test images (labels in stage_2_test_labels.csv)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed: the same seed writes the same images")
    p.add_argument("--size", type=_int_at_least(64, 4096), default=1024, metavar="PX",  # make_dataset's minimum
                   help="image side in pixels, 64 to 4096 (RSNA: 1024)")
    _workers_option(p)
    p.set_defaults(func=cmd_synth)

    p = command("validate", "report what is wrong in a data directory, file by file")
    _add_data_dir(p, "RSNA-layout data folder")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    _workers_option(p)
    p.set_defaults(func=cmd_validate)

    p = command("prepare", "decode the training images once into a cache")
    _add_data_dir(p, "RSNA-layout data folder")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="cache folder (default: outputs/data/<fingerprint>)")
    p.add_argument("--image-size", type=_positive_int, default=TrainConfig.image_size, metavar="PX",
                   help="side in pixels (default: the training default, %(default)s)")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction, metavar="F",
                   help="share of the labelled images held out for validation (default: the training default, "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, metavar="N",
                   help="seed of the train/validation split (default: the training default, %(default)s)")
    _workers_option(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    _add_cluster_options(p, "decode")
    p.set_defaults(func=cmd_prepare)

    p = command("train", "train one run (the same fit() as notebooks/02-train.ipynb)", epilog=_train_epilog())
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="RSNA data dir or prepared dir (default: the parameters' data_dir, "
                        f"else {TrainConfig.data_dir})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="run directory (default outputs/runs/train/<stamp>)")
    p.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="YAML file of training parameters (default: none, TrainConfig's defaults)")
    p.add_argument("-p", action="append", metavar="KEY=VALUE",
                   help="set one training parameter, over --params (repeatable; `pneumo params` lists them)")
    p.set_defaults(func=cmd_train)

    p = command("params", "list the training parameters: name, type, default, choices")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, type, default, choices}")
    p.set_defaults(func=cmd_params)

    p = command("sweep", "papermill runs of notebooks/02-train.ipynb in parallel, one per parameter set")
    p.add_argument("params", type=Path, help="sweep file, e.g. params/optimizers.yaml")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="outputs root: runs/<sweep>/, sweeps/<sweep>/ (summary), models/<sweep>/, data/ "
                        "(default: $PNEUMO_OUTPUTS, else the nearest outputs/ folder, else ./outputs)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="RSNA data directory (default: the sweep file's data_dir, else the training default)")
    p.add_argument("--max-parallel", type=_positive_int, default=None, metavar="N",
                   help="runs at once (default: one per GPU, else one per CPU core)")
    p.add_argument("--resume", action="store_true", help="finish the runs that are not done")
    p.add_argument("--marathon", action="store_true", help="then train the best run longer into a model")
    p.add_argument("--print-name", action="store_true", help="only check the sweep file and print its name")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="a search's Optuna study: SQLAlchemy URL (default sqlite:///<out>/sweeps/<name>/study.db)")
    _add_cluster_options(p, "run")
    p.set_defaults(func=cmd_sweep)

    p = command("predict", "boxes for a folder of DICOMs: submission.csv, annotations.json, annotated images")
    _add_model_options(p)  # MODEL first: the positionals go in the order they are added
    p.add_argument("images_dir", type=Path, metavar="IMAGES_DIR", help="folder of DICOM files")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the outputs")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--labels", type=Path, default=None, metavar="CSV", help="labels CSV: draw ground truth and score")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: up to 2)")
    p.add_argument("--images", choices=("preview", "full", "none"), default="preview",
                   help="annotated image per input: preview = half size JPEG with the patientId and a legend, "
                        "full = full size PNG, none = no images (default: preview)")
    p.add_argument("--no-images", dest="images", action="store_const", const="none", help="same as --images none")
    p.add_argument("--dicom-sr", action="store_true", help="DICOM SR (TID 1500) of the boxes: OUT/sr/<patientId>.dcm")
    p.add_argument("--dicom-gsps", action="store_true",
                   help="DICOM presentation state drawing the boxes: OUT/gsps/<patientId>.dcm")
    p.set_defaults(func=cmd_predict)

    p = command("serve", "HTTP service: POST /predict a DICOM, get boxes")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.set_defaults(func=cmd_serve)

    p = command("score", "official RSNA mAP of a submission against labels")
    p.add_argument("submission", type=Path, metavar="SUBMISSION", help="submission CSV: patientId,PredictionString")
    p.add_argument("labels", type=Path, metavar="LABELS", help="labels CSV: patientId,x,y,width,height,Target")
    p.add_argument("--json", action="store_true", help="machine-readable score")
    p.add_argument("--per-image", action="store_true", help="with --json: per-image scores too")
    p.set_defaults(func=cmd_score)
    return parser


_HINTS = {
    errno.ENOSPC: " (free some space, or give --out on another disk; a re-run resumes)",
    errno.EDQUOT: " (over your disk quota; a re-run resumes)",
    errno.EFBIG: " (over the file size limit; a re-run resumes)",
    errno.EROFS: " (a read-only file system: give --out a writable folder)",
    errno.EACCES: " (no permission: give --out a folder you can write)",
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except PneumoError as exc:
        print(f"pneumo: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        from pneumo.io import system_error

        cause = system_error(exc)
        if cause is None or args.verbose:  # not the file system's answer: a bug, with its traceback
            raise
        # full disk, read-only or forbidden folder, ...: the file system's reason, on one line
        where = cause.filename if cause.filename is not None else "writing the outputs"
        print(f"pneumo: error: {where}: {cause.strerror}{_HINTS.get(cause.errno, '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pneumo: interrupted", file=sys.stderr)
        return 130
