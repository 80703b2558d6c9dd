from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pneumo.data.dicom import parse_age, read_dicom, read_meta, resize_area
from pneumo.errors import DicomError


def write_uncompressed(path, pixels, photometric="MONOCHROME2", bits_stored=None, signed=False, **tags):
    """An uncompressed DICOM of any bit depth, as scanners and PACS exports write them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID = Path(path).stem
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 or photometric.startswith("MONO") else 3
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:] if pixels.ndim == 2 else pixels.shape[:2]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels.ndim == 3 and photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_reads_synthetic_rsna_file(synth_dir):
    path = next((synth_dir / "stage_2_train_images").glob("*.dcm"))
    image, meta = read_dicom(path)
    assert image.dtype == np.uint8 and image.shape == (256, 256)
    assert meta.patientId == path.stem == meta.PatientID
    assert meta.PatientSex in ("M", "F") and meta.ViewPosition in ("AP", "PA")
    assert isinstance(meta.PatientAge, float)
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert read_meta(path).rows == 256


@pytest.mark.parametrize("text,years", [("51", 51), ("051Y", 51), ("6M", 0.5), ("026W", 0.498), ("", None),
                                        ("abc", None), (None, None)])
def test_parse_age(text, years):
    assert parse_age(text) == (pytest.approx(years, abs=1e-3) if years is not None else None)


def test_16_bit_without_window_uses_the_image_range(tmp_path):
    pixels = np.array([[0, 2048], [4095, 1024]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    image, meta = read_dicom(write_uncompressed(tmp_path / "a.dcm", pixels, bits_stored=12))
    assert meta.bits_stored == 12
    assert image[0, 0] == 0 and image[0, 15] == 128 and image[8, 0] == 255


def test_window_center_width_is_applied(tmp_path):
    pixels = np.array([[0, 1000], [1500, 4000]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    path = write_uncompressed(tmp_path / "w.dcm", pixels, bits_stored=12, WindowCenter=1000, WindowWidth=1000)
    image, _ = read_dicom(path)
    # below the window -> black, above -> white, the centre -> mid grey
    assert image[0, 0] == 0 and image[8, 8] == 255 and abs(int(image[0, 8]) - 128) <= 2


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.array([[0, 255]], dtype=np.uint8).repeat(16, 0).repeat(8, 1)
    mono2, _ = read_dicom(write_uncompressed(tmp_path / "m2.dcm", pixels))
    mono1, _ = read_dicom(write_uncompressed(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert np.array_equal(mono1, 255 - mono2)


def test_signed_16_bit(tmp_path):
    pixels = np.array([[-1024, 0], [1023, 3071]], dtype=np.int16).repeat(8, 0).repeat(8, 1)
    image, _ = read_dicom(write_uncompressed(tmp_path / "s.dcm", pixels, bits_stored=16, signed=True))
    assert image[0, 0] < image[0, 8] < image[8, 0] < image[8, 8]


def test_non_square_size_is_kept(tmp_path):
    pixels = (np.arange(40 * 60) % 256).astype(np.uint8).reshape(40, 60)
    image, meta = read_dicom(write_uncompressed(tmp_path / "r.dcm", pixels))
    assert image.shape == (40, 60) and (meta.rows, meta.columns) == (40, 60)
    assert resize_area(image, 16).shape == (16, 16)


def test_resize_area_averages():
    image = np.zeros((4, 4), np.uint8)
    image[:2, :2] = 200
    assert np.array_equal(resize_area(image, 2), [[200, 0], [0, 0]])


@pytest.mark.parametrize("case,reason", [
    ("text", "not a DICOM"),
    ("empty", "empty file"),
    ("truncated", ""),
    ("no_pixels", "no pixel data"),
    ("rgb", "not a grayscale"),
    ("missing", "no such file"),
])
def test_unusable_files_raise_one_package_error(tmp_path, synth_dir, case, reason):
    path = tmp_path / f"{case}.dcm"
    good = next((synth_dir / "stage_2_train_images").glob("*.dcm"))
    if case == "text":
        path.write_text("patientId,x\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "no_pixels":
        ds = pydicom.dcmread(good)
        del ds.PixelData
        ds.save_as(path)
    elif case == "rgb":
        write_uncompressed(path, np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    assert str(path) in str(err.value) and reason in err.value.reason


def test_multi_frame_is_refused(tmp_path):
    path = write_uncompressed(tmp_path / "mf.dcm", np.zeros((16, 16), np.uint8))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.Rows = 8
    ds.save_as(path)
    with pytest.raises(DicomError, match="multi-frame"):
        read_dicom(path)


def test_pydicom_test_files_never_raise_anything_else():
    """Every file pydicom ships for its own tests either reads as uint8 2-D or is a DicomError."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) > 30
    read, refused = 0, 0
    for path in files:
        try:
            image, meta = read_dicom(path)
        except DicomError as exc:
            assert exc.reason and str(path) in str(exc)
            refused += 1
            continue
        assert image.dtype == np.uint8 and image.ndim == 2 and image.shape == (meta.rows, meta.columns)
        read += 1
    # compressed grayscale (JPEG lossless, JPEG-LS, JPEG 2000, RLE) decode with the pylibjpeg plugins
    assert read >= 15, (read, refused)


def test_compressed_grayscale_syntaxes_decode():
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"):
        image, _ = read_dicom(folder / name)
        assert image.std() > 1, name


@pytest.mark.parametrize("in_header", [True, False], ids=["rows-columns", "jpeg-frame-header"])
def test_decompression_bomb_is_refused_from_the_header_before_decoding(synth_dir, tmp_path, in_header):
    import time

    from pneumo.data.synth import write_bomb
    from pneumo.limits import MAX_IMAGE_PIXELS

    source = next((synth_dir / "stage_2_test_images").glob("*.dcm"))
    bomb = tmp_path / "bomb.dcm"
    write_bomb(source, bomb, 14000, 14000, in_header=in_header)  # 196 MP: Pillow refuses, pylibjpeg would not
    start = time.process_time()
    with pytest.raises(DicomError, match="over the limit") as info:
        read_dicom(bomb)
    assert time.process_time() - start < 1.0  # decoding it took 6.6 s and 1.2 GB
    assert "14000x14000" in info.value.reason and f"{MAX_IMAGE_PIXELS:,}" in info.value.reason


def test_an_image_at_the_pixel_limit_is_still_read(tmp_path, monkeypatch):
    import pneumo.data.dicom

    monkeypatch.setattr(pneumo.data.dicom, "MAX_IMAGE_PIXELS", 64 * 48)
    image, meta = read_dicom(write_uncompressed(tmp_path / "a.dcm", np.zeros((48, 64), np.uint16)))
    assert image.shape == (48, 64)
    with pytest.raises(DicomError, match="over the limit"):
        read_dicom(write_uncompressed(tmp_path / "b.dcm", np.zeros((49, 64), np.uint16)))


def test_model_size_decode_scales_jpeg_in_the_decoder_and_matches_the_full_decode(synth_dir):
    """A model-size read of a JPEG Baseline file comes back scaled by the decoder (never below
    the size asked) and, area-resized, within a grey level of the full decode resized."""
    for path in sorted((synth_dir / "stage_2_train_images").glob("*.dcm"))[:6]:
        full, meta = read_dicom(path)
        for size, side in ((32, 32), (64, 64), (100, 128), (200, 256)):
            scaled, scaled_meta = read_dicom(path, min_size=size)
            assert scaled.shape == (side, side) and scaled_meta == meta  # the frame stays the file's own
            diff = np.abs(resize_area(scaled, size).astype(int) - resize_area(full, size).astype(int))
            # an exact scale (a power of two of the side) stays under a grey level; another size is
            # area-resized from the next larger scale, a different filter: within 1.5 on these noisy images
            assert diff.mean() < (1.0 if size == side else 1.5) and diff.max() <= 12


def test_model_size_decode_keeps_other_files_whole(tmp_path, synth_dir):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (256, 1))
    image, _ = read_dicom(write_uncompressed(tmp_path / "u16.dcm", ramp, bits_stored=12), min_size=64)
    assert image.shape == (256, 256)  # not JPEG: decoded whole, the caller resizes
    windowed = tmp_path / "windowed.dcm"  # a window is computed on the full image's values
    ds = pydicom.dcmread(next((synth_dir / "stage_2_train_images").glob("*.dcm")))
    ds.WindowCenter, ds.WindowWidth = 128, 200
    ds.save_as(windowed)
    assert read_dicom(windowed, min_size=64)[0].shape == (256, 256)


def test_an_unknown_value_representation_is_one_dicom_error(synth_dir, tmp_path):
    """Found by the property tests: pydicom raises NotImplementedError for it on first access."""
    raw = next((synth_dir / "stage_2_test_images").glob("*.dcm")).read_bytes()
    path = tmp_path / "vr.dcm"
    path.write_bytes(raw.replace(b"\x10\x00\x20\x00LO", b"\x10\x00\x20\x00L\x00", 1))  # PatientID's VR
    for reader in (read_dicom, read_meta):
        with pytest.raises(DicomError, match="invalid DICOM header value"):
            reader(path)
