import json
import os

import numpy as np
import pytest
from PIL import Image

from pneumo.io import (
    atomic_dir,
    atomic_file,
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


class Boom(Exception):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_complete_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01" * 1000)
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2], "path": tmp_path})
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" * 1000
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2], "path": str(tmp_path)}
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_atomic_write_gives_the_permissions_of_open(tmp_path):
    atomic_write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_atomic_save_image_round_trips(tmp_path):
    image = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8))
    atomic_save_image(tmp_path / "img.png", image, compress_level=1)
    with Image.open(tmp_path / "img.png") as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(image))
    assert _leftovers(tmp_path) == []


def _write_half(path):
    with atomic_file(path, "w") as f:
        f.write("half of the new content")
        f.flush()
        raise Boom


class _FailingImage:
    """Writes half a file, then fails, as a crash inside Pillow's encoder would."""

    def save(self, f, format, **options):
        f.write(b"\x89PNG half")
        raise Boom


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_text(p, object()),  # TypeError inside the write
    lambda p: atomic_write_bytes(p, "not bytes"),
    lambda p: _write_half(p),
    lambda p: atomic_save_image(p, _FailingImage()),
])
def test_failure_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, write):
    target = tmp_path / "f.out"
    target.write_bytes(b"old content")
    with pytest.raises((TypeError, Boom)):
        write(target)
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_failure_on_a_new_file_leaves_no_file(tmp_path):
    with pytest.raises(Boom):
        atomic_save_image(tmp_path / "new.png", _FailingImage())
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_success_replaces_the_old_directory(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # the old directory is intact until the block ends
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise Boom
    assert sorted(os.listdir(target)) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_on_a_new_directory_leaves_nothing(tmp_path):
    with pytest.raises(Boom), atomic_dir(tmp_path / "cache"):
        raise Boom
    assert list(tmp_path.iterdir()) == []
