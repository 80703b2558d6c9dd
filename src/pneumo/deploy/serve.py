"""`pneumo serve`: an HTTP service around one loaded model (FastAPI + uvicorn).

POST /predict  one DICOM (multipart field `file`, or JSON {"dicom_base64": ...}) -> boxes;
               ?format=sr -> the boxes as a DICOM SR file (application/dicom, pneumo.deploy.sr)
GET  /health   liveness and the model name
GET  /model    the model card

No client can hold it or make its memory grow past the bound in pneumo.limits: a connection must
send its headers in time (pneumo.deploy.http_guard) and its body too (408); a body is read up to
its byte cap (413) by at most MAX_CONCURRENT_UPLOADS requests at once and parsed off the event
loop, so /health answers within milliseconds whatever the uploads do.
"""

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path

from pneumo.limits import (
    ANNOTATED_MAX_SIDE,
    BODY_TIMEOUT_S,
    GRACEFUL_SHUTDOWN_S,
    HEADER_TIMEOUT_S,
    MAX_CONCURRENT_DECODES,
    MAX_CONCURRENT_UPLOADS,
    MAX_FILENAME_CHARS,
    MAX_HEADER_BYTES,
    MAX_JSON_BODY_BYTES,
    MAX_JSON_FIELDS_BYTES,
    MAX_MULTIPART_BODY_BYTES,
    MAX_UPLOAD_BYTES,
)

# where a JSON upload's DICOM starts: a key stands after { or , (a quote inside a string is escaped)
_DICOM_KEY = re.compile(rb'[{,]\s*"dicom_base64"\s*:\s*"')
_NEEDS_DICOM = "JSON body needs 'dicom_base64': the DICOM file in base64"


def create_app(model, threshold: float | None = None, min_box_area: float | None = None,
               body_timeout: float = BODY_TIMEOUT_S):
    import threading

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from pneumo.deploy.predict import load_predictor
    from pneumo.deploy.registry import resolve_model

    predictor = load_predictor(model, threshold, min_box_area)  # once, at start-up
    _, card = resolve_model(model)
    # made once; a card is read from a file and may hold NaN, which a JSON answer cannot carry
    about = json_safe({"name": predictor.name, "threshold": predictor.threshold,
                       "postprocess": predictor.settings.to_dict(), "image_size": predictor.image_size,
                       "params": predictor.config.to_dict(), "card": card})
    lock = threading.Lock()  # one forward pass at a time: torch already uses every core
    # decodes run in the thread pool (40 threads); this bounds how many hold an image at once
    decodes = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
    uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)  # bodies held at once, from first byte to answer
    app = FastAPI(title="pneumo", description="Pneumonia opacity boxes for chest X-ray DICOMs")

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, exc):  # the client left mid-upload: no one to answer, nothing to log
        return Response(status_code=499)

    @app.get("/health")
    async def health():  # on the event loop: it never queues behind uploads in the thread pool
        return {"status": "ok", "model": predictor.name}

    @app.get("/model")
    async def model_card():
        return about

    @app.post("/predict")
    async def predict(request: Request, annotated: bool = False, format: str = "json"):
        if format not in ("json", "sr"):
            raise HTTPException(400, f"format={format}: use json (boxes) or sr (a DICOM SR of the boxes)")
        async with uploads:
            data, filename = await read_upload(request, body_timeout)
            # decoding and inference are blocking: run them off the event loop
            result = await run_in_threadpool(predict_upload, predictor, lock, data, filename, annotated, decodes)
            if format == "sr":
                report, warnings = await run_in_threadpool(sr_upload, data, result, predictor.name, filename,
                                                           decodes)
                headers = {"X-Pneumo-Warnings": "; ".join(warnings)} if warnings else {}
                return Response(report, media_type="application/dicom", headers=headers)
        return JSONResponse(result)

    return app


def json_safe(value):
    """value with every non-finite float as None: JSON has no NaN, and json.dumps refuses it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())  # an error about a hostile header may quote a lot of it
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- reading a request


def _too_big():
    from fastapi import HTTPException

    return HTTPException(413, f"upload over the {MAX_UPLOAD_BYTES} byte limit (pneumo.limits.MAX_UPLOAD_BYTES)")


def declared_length(request, limit: int) -> int:
    """The request's Content-Length (0 without one), refused with 413 past limit bytes."""
    from fastapi import HTTPException

    try:
        declared = max(0, int(request.headers.get("content-length") or 0))
    except ValueError:
        raise HTTPException(400, "Content-Length is not a number") from None
    if declared > limit:
        raise _too_big()
    return declared


def capped_receive(request, limit: int, timeout: float):
    """request.receive, refused with 413 past limit bytes (whatever Content-Length says: a chunked
    body has none, and one may lie) and with 408 when the body is not in within timeout seconds."""
    from fastapi import HTTPException

    declared_length(request, limit)
    deadline, size = asyncio.get_running_loop().time() + timeout, 0

    async def receive():
        nonlocal size
        try:
            async with asyncio.timeout_at(deadline):
                message = await request.receive()
        except TimeoutError:
            raise HTTPException(408, f"request body not received within {timeout:g} s "
                                     "(pneumo.limits.BODY_TIMEOUT_S)") from None
        size += len(message.get("body", b""))
        if size > limit:
            raise _too_big()
        return message

    return receive


async def read_upload(request, timeout: float = BODY_TIMEOUT_S) -> tuple[bytes, str]:
    """The DICOM bytes and file name of a request: multipart field `file`, or JSON `dicom_base64`."""
    from fastapi import HTTPException
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # parsed as it streams in; the form parser spools the file to disk past 1 MB
        form = await Request(request.scope, capped_receive(request, MAX_MULTIPART_BODY_BYTES, timeout)).form(
            max_files=1, max_fields=16)
        try:
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(400, "multipart upload needs a file part named 'file', with a filename")
            filename = _filename(upload.filename or "")
            return await upload.read(), filename
        finally:
            await form.close()
    if content_type.startswith("application/json"):
        body = Request(request.scope, capped_receive(request, MAX_JSON_BODY_BYTES, timeout))
        # one block of the declared size filled in place (a chunked body, which declares none, grows it):
        # neither regrowth copies on the event loop nor a join of many chunks doubling the body
        raw, size = bytearray(declared_length(request, MAX_JSON_BODY_BYTES)), 0
        async for chunk in body.stream():
            raw[size : size + len(chunk)] = chunk
            size += len(chunk)
        del raw[size:]
        # a second of CPU for a large upload: off the event loop, where it held /health for seconds
        return await run_in_threadpool(parse_json_upload, raw)
    raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with 'dicom_base64'")


def _filename(name) -> str:
    from fastapi import HTTPException

    if not isinstance(name, str) or len(name) > MAX_FILENAME_CHARS:
        raise HTTPException(400, f"filename: a string of at most {MAX_FILENAME_CHARS} characters")
    return name


def parse_json_upload(raw: bytearray) -> tuple[bytes, str]:
    """The DICOM bytes and file name of a JSON body, which is emptied. The base64 text is decoded
    where it lies in the body, never made a Python str (a second copy, four times the size if one
    wide character is in the body); only the small rest is parsed as JSON."""
    try:
        pieces, filename = _json_upload_pieces(raw)
    finally:
        raw.clear()
    return b"".join(pieces), filename  # joined once the body is gone; a large join lets go of the GIL


def _json_upload_pieces(raw: bytearray) -> tuple[list[bytes], str]:
    from fastapi import HTTPException

    # a key further in would have more than the fields' cap before it
    key = _DICOM_KEY.search(raw, 0, MAX_JSON_FIELDS_BYTES)
    start = key.end() if key else len(raw)
    end = raw.find(b'"', start) if key else start
    if end < 0:
        raise HTTPException(400, "JSON body: the dicom_base64 string has no end")
    if len(raw) - (end - start) > MAX_JSON_FIELDS_BYTES:
        raise HTTPException(400, f"JSON body: more than {MAX_JSON_FIELDS_BYTES} bytes besides dicom_base64 "
                                 "(pneumo.limits.MAX_JSON_FIELDS_BYTES)")
    try:
        fields = json.loads(raw[:start] + raw[end:])
    except RecursionError:
        raise HTTPException(400, "JSON body nested too deeply") from None
    except ValueError as exc:
        raise HTTPException(400, f"JSON body is not JSON ({_short(exc, 100)})") from None
    value = fields.get("dicom_base64") if isinstance(fields, dict) else None
    twice = key is not None and isinstance(value, str) and value != ""  # the found one is "" in `fields`
    if not isinstance(value, str) or twice:
        raise HTTPException(400, _NEEDS_DICOM + (" (given twice)" if twice else ""))
    filename = _filename(fields.get("filename", ""))
    text, start, end = _unescaped(raw, start, end) if key else (value.encode(), 0, len(value.encode()))
    try:
        return _base64_pieces(text, start, end), filename
    except binascii.Error:
        raise HTTPException(400, _NEEDS_DICOM) from None


def _unescaped(raw: bytearray, start: int, end: int):
    """(text, start, end): raw itself, or a copy without the escaped slashes JSON allows (PHP writes
    them), unescaped a megabyte at a time so the body and one copy are the most held."""
    from fastapi import HTTPException

    if raw.find(b"\\", start, end) < 0:
        return raw, start, end
    if raw.count(b"\\", start, end) != raw.count(b"\\/", start, end):
        raise HTTPException(400, "dicom_base64: a JSON escape that is not base64 (only \\/ is)")
    out, i = bytearray(), start
    while i < end:
        j = min(i + _PIECE, end)
        j += raw[j - 1] == 0x5C  # keep a \/ in one piece
        out += raw[i:j].replace(b"\\/", b"/")
        i = j
    raw.clear()  # its fields are parsed: the copy alone is needed, and the body with both would be three
    return out, 0, len(out)


_PIECE = 1 << 20  # base64 characters decoded at a time (a multiple of 4)


def _base64_pieces(text, start: int, end: int) -> list[bytes]:
    """text[start:end] decoded a megabyte at a time: one call on 86 MB held the GIL, and with it
    the event loop, for 0.4 s."""
    if text.find(b"=", start, max(start, end - 2)) >= 0:  # each piece is checked alone: "=" ends only the last
        raise binascii.Error("padding before the end")
    with memoryview(text) as view:
        return [binascii.a2b_base64(view[i:min(i + _PIECE, end)], strict_mode=True) for i in range(start, end, _PIECE)]


# ---------------------------------------------------------------- answering it


def predict_upload(predictor, lock, data: bytes, filename: str, annotated: bool, decodes=None) -> dict:
    """One uploaded DICOM through the predictor: the response body (4xx for a bad upload)."""
    from fastapi import HTTPException

    from pneumo.boxes import as_boxes, box_records

    if not data:
        raise HTTPException(400, "empty upload")
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"upload of {len(data)} bytes is over the {MAX_UPLOAD_BYTES} byte limit")
    with decodes or contextlib.nullcontext():
        item = _decode(data, predictor.image_size, annotated, filename)
        # only a scaled copy leaves the decode slot: 30 annotated 6000 x 6000 uploads kept 1.3 GB of full images
        preview, scale = _preview(item.full) if annotated else (None, 1.0)
        item.full = None
    with lock:
        probs, opacity = predictor.outputs(item.image[None], [item.meta])
    boxes, conf = predictor.boxes(probs[0], *item.shape, None if opacity is None else float(opacity[0]))
    patient_id = Path(filename).stem if filename else (item.meta["PatientID"] or "upload")
    result = {"patientId": patient_id, "boxes": box_records(boxes, conf), "image_size": list(item.shape),
              "model": predictor.name}
    if annotated:
        from pneumo.render import annotate

        buf = io.BytesIO()
        annotate(preview, as_boxes(boxes) * scale, conf).save(buf, format="PNG")
        result["annotated_png_base64"] = base64.b64encode(buf.getvalue()).decode()
    return result


def _decode(data: bytes, image_size: int, keep_full: bool, filename: str):
    from fastapi import HTTPException

    from pneumo.data.layout import decode_file

    # pydicom reads from a path; a temporary file keeps one reading code path for CLI and service
    with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            item = decode_file(tmp.name, image_size, keep_full=keep_full)
        except RecursionError:  # sequences nested past Python's limit
            raise HTTPException(422, f"{filename or 'upload'}: DICOM header nested too deeply") from None
    if item.error is not None:
        raise HTTPException(422, f"{filename or 'upload'}: {item.error}")
    return item


def _preview(full):
    """(the image scaled to at most ANNOTATED_MAX_SIDE a side, the scale)."""
    import numpy as np
    from PIL import Image

    scale = min(1.0, ANNOTATED_MAX_SIDE / max(full.shape))
    if scale == 1.0:
        return full, scale
    size = (max(1, round(full.shape[1] * scale)), max(1, round(full.shape[0] * scale)))
    return np.asarray(Image.fromarray(full).resize(size, Image.Resampling.BOX)), scale


def sr_upload(data: bytes, result: dict, model_name: str, filename: str, decodes=None) -> tuple[bytes, list[str]]:
    """The DICOM SR of an upload's boxes (4xx for a header it cannot be made from)."""
    from fastapi import HTTPException

    from pneumo.deploy.sr import upload_report
    from pneumo.errors import PneumoError

    try:
        with decodes or contextlib.nullcontext():  # the header is parsed again: as costly as a decode's
            return upload_report(data, result, model_name)
    # a header that highdicom or pydicom refuse; AttributeError and RecursionError are how they
    # refuse a missing Modality or sequences nested 150 deep. Anything else is a bug: a 500 with no detail.
    except (PneumoError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise HTTPException(422, f"{filename or 'upload'}: no SR for this header ({_short(exc)})") from None


def serve(model, host: str = "127.0.0.1", port: int = 8000, threshold=None, min_box_area=None, *,
          header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S,
          shutdown_timeout: float = GRACEFUL_SHUTDOWN_S) -> None:
    import uvicorn

    from pneumo.deploy.http_guard import guarded_protocol

    # the connection cap is the protocol's: uvicorn's limit_concurrency counted idle sockets as load
    uvicorn.run(create_app(model, threshold, min_box_area, body_timeout), host=host, port=port, log_level="info",
                http=guarded_protocol(header_timeout, shutdown_timeout), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                timeout_graceful_shutdown=shutdown_timeout)
