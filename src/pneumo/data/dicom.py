"""Read any single-frame grayscale DICOM into a uint8 image plus the metadata pneumo uses.

RSNA files are 8-bit MONOCHROME2 JPEG Baseline; users also bring uncompressed 12/16-bit,
MONOCHROME1 and other sizes. Every file that cannot be used raises DicomError with a reason
the user can act on.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from pneumo.errors import DicomError
from pneumo.limits import MAX_IMAGE_PIXELS

# Which installable package decodes which transfer syntax, for the error message.
_DECODER_HINT = {
    "1.2.840.10008.1.2.4.50": "Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg (RLE)",
}

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


@dataclass(frozen=True)
class DicomMeta:
    """What pneumo keeps of a DICOM header. rows/columns are the image's own pixel frame."""

    patientId: str
    PatientID: str
    PatientSex: str
    PatientAge: float | None
    ViewPosition: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    photometric: str
    bits_stored: int
    transfer_syntax: str

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def quiet_pydicom():
    """Silence pydicom's value warnings: RSNA files store PatientAge as '51' (not the standard
    '051Y'), which pydicom flags on every access; parse_age reads both forms."""
    _library_logs_at_debug()  # pydicom logs each warning too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def parse_age(value) -> float | None:
    """DICOM AgeString ('051Y', '6M', '10W', '20D') or RSNA's plain '51' -> years; None if absent."""
    if value is None:
        return None
    m = _AGE.match(str(value))
    if not m:
        return None
    years = float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    return round(years, 3) if 0 <= years < 150 else None


class _AtDebug(logging.Handler):
    """Hands pydicom's records (its child loggers' too) to the `pneumo.libraries` logger at debug level."""

    def emit(self, record):
        target = logging.getLogger("pneumo.libraries")
        if target.isEnabledFor(logging.DEBUG):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            target.handle(record)


@cache
def _library_logs_at_debug() -> None:
    """pydicom logs a traceback on its own stderr handler when one decoder plugin fails and it
    tries the next: a user would see "Traceback" from a run that succeeded. pneumo reports every
    unusable file itself, so pydicom's records go to pneumo's logging at debug level (shown with
    -v). Done at first use (also in each worker process), not on import."""
    logger = logging.getLogger("pydicom")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(_AtDebug())
    logger.propagate = False


def _read_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    _library_logs_at_debug()
    if path.is_file() and path.stat().st_size == 0:
        raise DicomError(path, "empty file")
    try:
        with quiet_pydicom():
            return pydicom.dcmread(path)
    except FileNotFoundError:
        raise DicomError(path, "no such file") from None
    except IsADirectoryError:
        raise DicomError(path, "is a directory") from None
    except InvalidDicomError:
        raise DicomError(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # pydicom raises many types on truncated/garbled headers
        raise DicomError(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from None


# what pydicom raises for a garbled element when it is first read (elements parse lazily)
_BAD_VALUE = (ValueError, TypeError, AttributeError, KeyError, NotImplementedError)


def _bad_values() -> tuple:
    """_BAD_VALUE and pydicom's own error for a value of the wrong length (an odd-length US, found
    by the property tests); pydicom is imported by then (the dataset was read)."""
    from pydicom.errors import BytesLengthException

    return (*_BAD_VALUE, BytesLengthException)


def _meta(path: Path, ds) -> DicomMeta:
    with quiet_pydicom():
        try:
            return _meta_fields(path, ds)
        except _bad_values() as exc:  # e.g. an unknown VR found by the property tests
            raise DicomError(path, f"invalid DICOM header value ({type(exc).__name__}: {exc})") from None


def _meta_fields(path: Path, ds) -> DicomMeta:
    spacing = ds.get("PixelSpacing")
    try:
        spacing = (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        spacing = None
    syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return DicomMeta(
        patientId=path.stem,
        PatientID=str(ds.get("PatientID", "") or ""),
        PatientSex=str(ds.get("PatientSex", "") or "").upper()[:1],
        PatientAge=parse_age(ds.get("PatientAge")),
        ViewPosition=str(ds.get("ViewPosition", "") or "").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        pixel_spacing=spacing,
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        bits_stored=int(ds.get("BitsStored", 8) or 8),
        transfer_syntax=str(syntax),
    )


def read_meta(path) -> DicomMeta:
    """Header only (no pixel decoding)."""
    path = Path(path)
    return _meta(path, _read_dataset(path))


def _check_usable(path: Path, ds, meta: DicomMeta) -> None:
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or meta.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"not a grayscale image (PhotometricInterpretation {meta.photometric or '?'})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(path, f"multi-frame image ({ds.NumberOfFrames} frames); pneumo reads single X-rays")
    if meta.rows < 8 or meta.columns < 8:
        raise DicomError(path, f"implausible image size {meta.rows}x{meta.columns}")
    _check_pixel_count(path, meta.rows, meta.columns, "Rows x Columns")
    if meta.transfer_syntax in _DECODER_HINT:
        # a compressed stream carries its own frame size, which is what a decoder allocates
        size = _codestream_size(bytes(ds.PixelData[:65536]))
        if size is not None:
            _check_pixel_count(path, *size, "the compressed image's own header")


def _check_pixel_count(path: Path, rows: int, columns: int, where: str) -> None:
    if rows * columns > MAX_IMAGE_PIXELS:
        raise DicomError(path, f"image of {rows}x{columns} pixels ({where}) is over the limit of "
                               f"{MAX_IMAGE_PIXELS:,} pixels (pneumo.limits.MAX_IMAGE_PIXELS); not decoded")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # incl. JPEG-LS


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) declared by the first JPEG, JPEG-LS or JPEG 2000 header in the pixel data
    bytes, None when there is none to read."""
    j2k = data.find(b"\xff\x4f\xff\x51")
    if j2k >= 0 and len(data) >= j2k + 24:  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        x, y, x0, y0 = (int.from_bytes(data[j2k + 8 + 4 * i:j2k + 12 + 4 * i], "big") for i in range(4))
        return max(y - y0, 0), max(x - x0, 0)
    i = data.find(b"\xff\xd8")
    if i < 0:
        return None
    i += 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _decode_scaled(ds, min_size: int) -> np.ndarray | None:
    """A JPEG Baseline grayscale frame decoded at the smallest DCT scale (1/2, 1/4, 1/8: Pillow's
    draft mode) that is still at least min_size on each side, or None where that does not apply.

    Scaling inside the decoder skips most of the inverse DCT: for a 1024 px RSNA file and a
    128-256 px model input it is several times faster than a full decode and then a resize."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as image:
            if image.mode != "L" or image.size != (int(ds.Columns), int(ds.Rows)):
                return None  # colour or mislabelled streams take pydicom's path, which checks them
            image.draft("L", (min_size, min_size))
            if min(image.size) < min_size:  # draft never goes below the request; be sure of it
                return None
            return np.asarray(image.convert("L"))
    except Exception:  # anything odd in the stream: the full decode below reports it properly
        return None


def _decode(path: Path, ds, meta: DicomMeta, min_size: int | None = None) -> np.ndarray:
    if meta.transfer_syntax == JPEG_BASELINE:
        if min_size and "WindowCenter" not in ds and "VOILUTSequence" not in ds:
            # a window is computed on the image's own values: those of the full decode
            scaled = _decode_scaled(ds, min_size)
            if scaled is not None:
                return scaled
        # Pillow decodes baseline JPEG (every RSNA file) 3x faster than pydicom's first choice,
        # pylibjpeg; that one stays the fallback for files Pillow refuses.
        try:
            ds.pixel_array_options(decoding_plugin="pillow")
            return ds.pixel_array
        except Exception:
            ds.pixel_array_options(decoding_plugin="")
    try:
        return ds.pixel_array
    except Exception as exc:
        text = str(exc)
        hint = _DECODER_HINT.get(meta.transfer_syntax)
        if hint and ("plugin" in text.lower() or "handler" in text.lower() or "decod" in text.lower()):
            raise DicomError(
                path, f"cannot decode transfer syntax {meta.transfer_syntax}: install {hint}"
            ) from None
        raise DicomError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {text})") from None


def to_uint8(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Map stored values to display grey levels 0..255 (0 = black, as on a MONOCHROME2 film).

    8-bit data without a VOI is kept as is (the RSNA fast path). Otherwise the modality LUT
    (rescale) is applied, then the window (WindowCenter/Width or VOI LUT) when the file has
    one, else the image's own value range. The own range rather than the stored bit range
    because real exports often declare 16 stored bits for 10-12 bits of signal, which the bit
    range would render almost black. MONOCHROME1 is inverted at the end.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if pixels.dtype == np.uint8 and not has_voi:
        out = pixels
    else:
        values = apply_modality_lut(pixels, ds)
        if has_voi:  # maps into the window's output range, rescaled to 0..255 below
            values = apply_voi_lut(values, ds)
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            out = np.zeros(values.shape, np.uint8)
        else:
            out = ((values - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


def read_dicom(path, min_size: int | None = None) -> tuple[np.ndarray, DicomMeta]:
    """(image uint8 [rows, columns], metadata) of a single-frame grayscale DICOM file.

    min_size: the caller only needs an image of at least this side (a model input): a JPEG
    Baseline image may then come back smaller than rows x columns, scaled by 1/2, 1/4 or 1/8 in
    the decoder; metadata keeps the image's own frame.
    """
    path = Path(path)
    ds = _read_dataset(path)
    try:
        meta = _meta(path, ds)
        with quiet_pydicom():
            _check_usable(path, ds, meta)
    except _bad_values() as exc:  # a garbled header value
        raise DicomError(path, f"invalid DICOM header value ({exc})") from None
    with quiet_pydicom():  # decoders warn about padding and odd values they cope with
        pixels = _decode(path, ds, meta, min_size)
    if pixels.ndim != 2:
        raise DicomError(path, f"unexpected pixel array shape {pixels.shape}")
    scaled = [(-(-meta.rows // k), -(-meta.columns // k)) for k in (2, 4, 8)] if min_size else []
    if pixels.shape != (meta.rows, meta.columns) and pixels.shape not in scaled:
        raise DicomError(path, f"pixel data {pixels.shape} does not match Rows x Columns {meta.rows}x{meta.columns}")
    try:
        return to_uint8(pixels, ds, meta.photometric), meta
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a garbled LUT or window
        raise DicomError(path, f"invalid grey-level tags ({exc})") from None


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 image of size x size by area averaging (Pillow's BOX filter)."""
    from PIL import Image

    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
