"""The pneumo command line: synthetic data, validation, training, sweeps, prediction and scoring.

Each command imports what it needs when it runs, so that `score`, `validate` and `synth` start
without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pneumo.errors import PneumoError

log = logging.getLogger("pneumo")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def cmd_synth(args) -> int:
    from pneumo.data.synth import make_dataset

    result = make_dataset(args.dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                          size=args.size, workers=args.workers)
    counts = ", ".join(f"{v} {k}" for k, v in result["classes"].items())
    print(f"wrote {result['train']} train ({counts}) and {result['test']} test DICOMs to {args.dir}")
    return 0


def cmd_validate(args) -> int:
    from pneumo.data.validate import validate

    report = validate(args.dir, workers=args.workers)
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
        print(f"pneumo: error: {args.dir}: not usable: {report.fatal}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args) -> int:
    from pneumo.data.prepare import prepare
    from pneumo.sweeps.cluster import close, dask_client

    client, cluster = dask_client(args.cluster, cluster_file=args.cluster_file) if args.cluster else (None, None)
    try:
        prepared = prepare(args.dir, out=args.out, image_size=args.image_size, val_fraction=args.val_fraction,
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
        print(load_sweep(args.params).name)
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
                             batch_size=args.batch_size, workers=args.workers, save_images=not args.no_images,
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


def _add_cluster_options(parser, verb: str) -> None:
    parser.add_argument("--cluster", default=None, metavar="WHERE",
                        help=f"{verb} on Dask: 'local', 'slurm', 'htcondor', 'pbs' (params/cluster/<kind>.yaml) "
                             "or a scheduler address")
    parser.add_argument("--cluster-file", type=Path, default=None,
                        help="cluster YAML (default params/cluster/<kind>.yaml)")


def build_parser() -> argparse.ArgumentParser:
    # pneumo.config imports no torch; prepare's defaults are the training defaults
    from pneumo.config import TrainConfig

    parser = argparse.ArgumentParser(prog="pneumo", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic RSNA-layout dataset")
    p.add_argument("dir", type=Path)
    p.add_argument("--n-train", type=_positive_int, default=400)
    p.add_argument("--n-test", type=_positive_int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (RSNA: 1024)")
    p.add_argument("--workers", type=_positive_int, default=None)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="report what is wrong in a data directory, file by file")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--workers", type=_positive_int, default=None)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prepare", help="decode the training images once into a cache")
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: outputs/data/<fingerprint>")
    p.add_argument("--image-size", type=_positive_int, default=TrainConfig.image_size,
                   help="side in pixels (default: the training default, %(default)s)")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--workers", type=_positive_int, default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    _add_cluster_options(p, "decode")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train one run (the same fit() as notebooks/02-train.ipynb)")
    p.add_argument("--data-dir", type=Path, default=None, help="RSNA data dir or prepared dir")
    p.add_argument("--out", type=Path, default=None, help="run directory (default outputs/runs/train/<stamp>)")
    p.add_argument("--params", type=Path, default=None, help="YAML file of TrainConfig parameters")
    p.add_argument("-p", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="papermill runs of notebooks/02-train.ipynb in parallel, one per parameter set")
    p.add_argument("params", type=Path, help="sweep file, e.g. params/optimizers.yaml")
    p.add_argument("--out", type=Path, default=None,
                   help="outputs root: runs/<sweep>/, sweeps/<sweep>/ (summary), models/<sweep>/, data/ "
                        "(default: $PNEUMO_OUTPUTS, else the nearest outputs/ folder, else ./outputs)")
    p.add_argument("--data-dir", default=None, help="RSNA data directory (overrides the file's data_dir)")
    p.add_argument("--max-parallel", type=_positive_int, default=None,
                   help="runs at once (default: one per GPU, else one per CPU core)")
    p.add_argument("--resume", action="store_true", help="finish the runs that are not done")
    p.add_argument("--marathon", action="store_true", help="then train the best run longer into a model")
    p.add_argument("--print-name", action="store_true", help="only check the sweep file and print its name")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="a search's Optuna study: SQLAlchemy URL (default sqlite:///<out>/sweeps/<name>/study.db)")
    _add_cluster_options(p, "run")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("predict", help="boxes for a folder of DICOMs: submission.csv, annotations.json, PNGs")
    p.add_argument("model", type=Path, help="run dir, model dir (outputs/models/<name>[/vN]) or .ckpt file")
    p.add_argument("images_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold", type=float, default=None, help="box probability threshold (default: the model's)")
    p.add_argument("--min-box-area", type=float, default=None, help="in original pixels (default: the model's)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--labels", type=Path, default=None, help="labels CSV: draw ground truth and score")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 2)")
    p.add_argument("--no-images", action="store_true", help="skip the annotated PNGs")
    p.add_argument("--dicom-sr", action="store_true", help="DICOM SR (TID 1500) of the boxes: OUT/sr/<patientId>.dcm")
    p.add_argument("--dicom-gsps", action="store_true",
                   help="DICOM presentation state drawing the boxes: OUT/gsps/<patientId>.dcm")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="HTTP service: POST /predict a DICOM, get boxes")
    p.add_argument("model", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-box-area", type=float, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="official RSNA mAP of a submission against labels")
    p.add_argument("submission", type=Path)
    p.add_argument("labels", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--per-image", action="store_true", help="with --json: per-image scores too")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except PneumoError as exc:
        print(f"pneumo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pneumo: interrupted", file=sys.stderr)
        return 130
