"""One pass over an RSNA data directory that reports what is wrong, file by file."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from pneumo.boxes import check_patient_id
from pneumo.data.layout import (
    CLASS_COLUMNS,
    CLASSES,
    POSITIVE_CLASS,
    dicom_files,
    layout,
    read_csv,
    read_labels_table,
    scan,
)
from pneumo.errors import DataError

EXPECTED_SIZE = (1024, 1024)  # frame assumed for boxes of a patient whose image is unusable
BLANK_STD = 1.0  # grey-level standard deviation below which an image carries no information


@dataclass
class Problem:
    patientId: str
    path: str
    problem: str
    detail: str
    severity: str  # "error": the item is unusable; "warning": usable, but look at it


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    n_train_images: int = 0
    n_test_images: int = 0
    n_usable_train: int = 0
    n_labelled_patients: int = 0
    fatal: str | None = None  # why the directory cannot be used at all

    @property
    def usable(self) -> bool:
        return self.fatal is None

    def add(self, patient_id, path, problem, detail, severity="error"):
        self.problems.append(Problem(str(patient_id or ""), str(path or ""), problem, detail, severity))

    def to_dict(self) -> dict:
        return {
            "usable": self.usable,
            "fatal": self.fatal,
            "n_train_images": self.n_train_images,
            "n_test_images": self.n_test_images,
            "n_usable_train": self.n_usable_train,
            "n_labelled_patients": self.n_labelled_patients,
            "counts": dict(Counter(p.problem for p in self.problems)),
            "problems": [asdict(p) for p in self.problems],
        }


def _check_images(report: Report, files, expected_ids, kind: str, workers) -> dict[str, tuple[int, int]]:
    """Report file problems; return {patientId: (rows, columns)} of the usable images."""
    usable, paths = {}, {}
    for item in scan(files, workers=workers, description=f"validating {kind} images", measure_std=True):
        if not item.path.endswith(".dcm"):
            report.add(item.patientId, item.path, "not a .dcm file", "file name does not end in .dcm", "warning")
        if item.error:
            report.add(item.patientId, item.path, "unreadable", item.error)
            continue
        meta = item.meta
        if item.std < BLANK_STD:
            report.add(item.patientId, item.path, "blank image", f"grey-level std {item.std:.2f}")
            continue
        if meta["photometric"] != "MONOCHROME2":
            report.add(item.patientId, item.path, "unexpected photometric",
                       f"{meta['photometric']} (inverted on reading)", "warning")
        if meta["PatientID"] and meta["PatientID"] != item.patientId:
            report.add(item.patientId, item.path, "PatientID mismatch",
                       f"DICOM PatientID {meta['PatientID']!r} differs from the file name", "warning")
        usable[item.patientId] = (meta["rows"], meta["columns"])
        paths[item.patientId] = item.path
        if expected_ids is not None and item.patientId not in expected_ids:
            report.add(item.patientId, item.path, "image without labels", "no row in the labels CSV", "warning")
    if usable:  # sizes are compared with the dataset's usual size (1024 x 1024 for RSNA)
        usual = Counter(usable.values()).most_common(1)[0][0]
        for pid, size in usable.items():
            if size != usual:
                report.add(pid, paths[pid], "unexpected size", f"{size[0]}x{size[1]}, most images are "
                           f"{usual[0]}x{usual[1]}; its boxes are read in its own frame", "warning")
    return usable


def _check_labels(report: Report, lay, labels, classes, sizes: dict) -> None:
    path = str(lay.labels)
    dup = labels.duplicated(keep="first")
    for row in labels[dup].itertuples(index=False):
        report.add(row.patientId, path, "duplicate row", "the same label row appears more than once", "warning")
    labels = labels[~dup]
    has_box = labels[["x", "y", "width", "height"]].notna().all(axis=1)
    partial = labels[["x", "y", "width", "height"]].notna().any(axis=1) & ~has_box
    for row in labels[partial].itertuples(index=False):
        report.add(row.patientId, path, "incomplete box", "some of x, y, width, height are empty")
    target = labels["Target"]
    for row in labels[(target == 1) & ~has_box].itertuples(index=False):
        report.add(row.patientId, path, "inconsistent row", "Target 1 without a box")
    for row in labels[(target == 0) & has_box].itertuples(index=False):
        report.add(row.patientId, path, "inconsistent row", "Target 0 with a box")
    for row in labels[~target.isin([0, 1])].itertuples(index=False):
        report.add(row.patientId, path, "inconsistent row", f"Target {row.Target!r} is not 0 or 1")
    mixed = labels.groupby("patientId")["Target"].nunique()
    for pid in mixed[mixed > 1].index:
        report.add(pid, path, "inconsistent rows", "the patient has both Target 0 and Target 1 rows")
    boxes = labels[has_box]
    w, h = boxes["width"].to_numpy(float), boxes["height"].to_numpy(float)
    x, y = boxes["x"].to_numpy(float), boxes["y"].to_numpy(float)
    rows = np.array([sizes.get(p, EXPECTED_SIZE)[0] for p in boxes["patientId"]], dtype=float).reshape(-1)
    cols = np.array([sizes.get(p, EXPECTED_SIZE)[1] for p in boxes["patientId"]], dtype=float).reshape(-1)
    bad = (w <= 0) | (h <= 0) | (x < 0) | (y < 0) | (x + w > cols) | (y + h > rows)
    for (pid, bx, by, bw, bh), r, c in zip(boxes.loc[bad, ["patientId", "x", "y", "width", "height"]]
                                           .itertuples(index=False), rows[bad], cols[bad]):
        report.add(pid, path, "box outside image", f"box ({bx:g}, {by:g}, {bw:g}, {bh:g}) in a {r:.0f}x{c:.0f} image")
    if classes is not None:
        cpath = str(lay.class_info)
        cls = classes.drop_duplicates()
        for row in cls[~cls["class"].isin(CLASSES)].itertuples(index=False):
            report.add(row.patientId, cpath, "unknown class", f"{row[1]!r} is not one of {', '.join(CLASSES)}",
                       "warning")
        multi = cls.groupby("patientId")["class"].nunique()
        for pid in multi[multi > 1].index:
            report.add(pid, cpath, "inconsistent class", "more than one class for the patient")
        cls = cls.drop_duplicates("patientId").set_index("patientId")["class"]
        patient_target = labels.groupby("patientId")["Target"].max()
        joined = patient_target.to_frame().join(cls, how="left")
        for pid, t, c in joined.itertuples():
            if not isinstance(c, str):
                report.add(pid, cpath, "missing class", "no row in the class CSV", "warning")
            elif (c == POSITIVE_CLASS) != (t == 1):
                report.add(pid, cpath, "inconsistent class", f"class {c!r} with Target {t}")


def validate(data_dir, workers: int | None = None) -> Report:
    """Check a data directory; DataError only if the directory itself does not exist."""
    lay = layout(data_dir)
    report = Report()
    labels = classes = None
    try:
        labels = read_labels_table(lay.labels)
    except DataError as exc:
        report.add("", lay.labels, "labels unusable", str(exc))
        report.fatal = str(exc)
    try:
        classes = read_csv(lay.class_info, CLASS_COLUMNS)
    except DataError as exc:
        report.add("", lay.class_info, "class info unusable", f"{exc}; classes are derived from Target", "warning")

    if labels is not None:
        bad_ids = []
        for pid in labels["patientId"].dropna().unique():
            try:
                check_patient_id(pid)
            except ValueError as exc:
                bad_ids.append(pid)
                report.add(pid, lay.labels, "invalid patientId", str(exc))
        labels = labels[labels["patientId"].notna() & ~labels["patientId"].isin(bad_ids)]
        report.n_labelled_patients = labels["patientId"].nunique()

    train_files = dicom_files(lay.train_images)
    report.n_train_images = len(train_files)
    if not lay.train_images.is_dir():
        report.fatal = report.fatal or f"{lay.train_images}: missing"
        report.add("", lay.train_images, "missing directory", "no training images directory")
    expected = set(labels["patientId"]) if labels is not None else None
    usable = _check_images(report, train_files, expected, "train", workers)
    test_files = dicom_files(lay.test_images)
    report.n_test_images = len(test_files)
    _check_images(report, test_files, None, "test", workers)

    if labels is not None:
        present = {p.stem for p in train_files}
        for pid in sorted(set(labels["patientId"]) - present):
            report.add(pid, lay.labels, "label without image", f"no {pid}.dcm in {lay.train_images.name}", "warning")
        _check_labels(report, lay, labels, classes, usable)
        report.n_usable_train = len(usable.keys() & set(labels["patientId"]))
        if report.fatal is None and report.n_usable_train == 0:
            report.fatal = "no training image is both readable and labelled"
    return report
