"""predict's resume bookkeeping: OUT/.parts holds one JSON file per input with its result.

Finished work is keyed by content, not names: the directory by the model's bytes and the
settings that shape every result (a different model copied over the same path starts over), each
part by its input's size and mtime and by how its image was drawn (a DICOM replaced under its
name, or images asked for after a --no-images run, are redone). A part damaged by a crash is
redone; temporaries of a killed write are cleared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pneumo.io import atomic_write_json


def settings_key(*shaping) -> str:
    """A key of what every result depends on (predict: the model's digest, its post-processing,
    the flip, the input size)."""
    return hashlib.sha256(json.dumps(shaping).encode()).hexdigest()[:16]


def _parts_dir(out: Path, key: str, model: str) -> Path:
    """OUT/.parts, emptied of the results of another model or other settings."""
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    settings = parts / "settings.key"  # not *.json: that name space belongs to the input files
    try:
        same = json.loads(settings.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):  # none yet, or damaged by a crash: start over
        same = False
    if not same:
        for p in parts.glob("*.json"):  # other model or settings: start over
            p.unlink()
        atomic_write_json(settings, {"key": key, "model": model})  # unchanged: not rewritten
    return parts


def _stamp(path: Path) -> list[int]:
    """An input's identity for resuming: a file replaced under its name has another size or
    mtime (hashing every DICOM would cost as much as decoding it)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _done(part: Path, stamp: list[int], drawing) -> bool:
    """The part holds this input's result, drawn as this run draws (drawing: None when no image is
    wanted); a part damaged by a crash is redone."""
    try:
        record = json.loads(part.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("input") != stamp:
        return False
    return "error" in record or drawing is None or record.get("drawn") == drawing


class Parts:
    """OUT/.parts: one JSON file per input with its result, keyed to the input's content stamp and
    to how its image was drawn, so a re-run redoes what changed and only that."""

    def __init__(self, out: Path, key: str, model: str, drawing, files):
        self.dir, self.drawing = _parts_dir(out, key, model), drawing
        self.stamps = {}
        for f in files:
            try:
                self.stamps[f] = _stamp(f)
            except OSError:  # gone since it was listed: decoding it will say why
                self.stamps[f] = None

    def path(self, f: Path) -> Path:
        # named by a hash: an input name may be as long as the file system allows, and the
        # part file adds a suffix (and its temporary file a prefix) to it
        return self.dir / f"{hashlib.sha256(f.name.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"

    def write(self, f: Path, record: dict) -> None:
        atomic_write_json(self.path(f), {**record, "input": self.stamps.get(f), "drawn": self.drawing})

    def done(self, f: Path) -> bool:
        return self.stamps.get(f) is not None and _done(self.path(f), self.stamps[f], self.drawing)


def file_key(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def remove_stale_temporaries(folder: Path) -> None:
    """The temporary files (pneumo.io's `.<name>.*.tmp`) of a run killed while it wrote images:
    pneumo's own, never a finished file."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def unusable(files) -> dict:
    """{file: reason} for the inputs that cannot be a submission row: a second name of one patientId
    (abc, abc.dcm), decided over the whole folder so that a re-run after a new name appeared cannot
    add a second row; a name with a comma, quote or control character (`abc\\n.dcm` would be two rows)."""
    first_of: dict[str, Path] = {}
    reasons = {}
    for f in files:
        if any(c in ',"\x7f\x85\u2028\u2029' or ord(c) < 32 for c in f.stem):
            reasons[f] = "the file name cannot be a patientId (a comma, a quote or a control character in it)"
        elif f.stem in first_of:
            reasons[f] = f"duplicate patientId (also {first_of[f.stem]})"
        else:
            first_of[f.stem] = f
    return reasons


def mark_unusable(files, parts: Parts) -> None:
    """Writes unusable(files)'s reasons as those files' results."""
    for f, reason in unusable(files).items():
        parts.write(f, {"path": str(f), "error": reason})
