"""The Kaggle submission CSV (patientId,PredictionString) read back, and scored against labels
with the official metric (`pneumo score`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumo.boxes import parse_prediction_string
from pneumo.data.layout import CSV_MISSING, read_labels
from pneumo.errors import SubmissionError
from pneumo.metrics import Score, mean_average_precision


def read_submission(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kaggle submission CSV (patientId,PredictionString) -> {patientId: (boxes, confidences)}."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patientId": str, "PredictionString": str}, **CSV_MISSING)
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such file") from None
    except OSError as exc:  # a directory, no permission
        raise SubmissionError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    missing = {"patientId", "PredictionString"} - set(df.columns)
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    out = {}
    for pid, text in df[["patientId", "PredictionString"]].itertuples(index=False):
        if pid in out:
            raise SubmissionError(f"{path}: patientId {pid} appears more than once")
        try:
            out[pid] = parse_prediction_string(text)
        except ValueError as exc:
            raise SubmissionError(f"{path}: patientId {pid}: malformed PredictionString: {exc}") from None
    return out


def score_files(submission, labels) -> Score:
    """The official score of a submission CSV against a labels CSV."""
    return mean_average_precision(read_labels(labels), read_submission(submission))
