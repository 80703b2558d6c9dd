"""`pneumo serve`: an HTTP service around one loaded model (FastAPI + uvicorn).

POST /predict  one DICOM (multipart field `file`, or JSON {"dicom_base64": ...}) -> boxes;
               ?format=sr -> the boxes as a DICOM SR file (application/dicom, pneumo.deploy.sr)
GET  /health   liveness and the model name
GET  /model    the model card
"""


import base64
import binascii
import contextlib
import io
import json
import tempfile
from pathlib import Path

from pneumo.limits import (
    MAX_CONCURRENT_DECODES,
    MAX_CONNECTIONS,
    MAX_JSON_BODY_BYTES,
    MAX_MULTIPART_BODY_BYTES,
    MAX_UPLOAD_BYTES,
)


def create_app(model, threshold: float | None = None, min_box_area: float | None = None):
    import threading

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from pneumo.deploy.predict import load_predictor
    from pneumo.deploy.registry import resolve_model

    predictor = load_predictor(model, threshold, min_box_area)  # once, at start-up
    _, card = resolve_model(model)
    lock = threading.Lock()  # one forward pass at a time: torch already uses every core
    # decodes run in the thread pool (40 threads); this bounds how many hold an image at once
    decodes = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
    app = FastAPI(title="pneumo", description="Pneumonia opacity boxes for chest X-ray DICOMs")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": predictor.name}

    @app.get("/model")
    def model_card():
        return {"name": predictor.name, "threshold": predictor.threshold, "postprocess": predictor.settings.to_dict(),
                "image_size": predictor.image_size, "params": predictor.config.to_dict(), "card": card}

    @app.post("/predict")
    async def predict(request: Request, annotated: bool = False, format: str = "json"):
        if format not in ("json", "sr"):
            raise HTTPException(400, f"format={format}: use json (boxes) or sr (a DICOM SR of the boxes)")
        data, filename = await read_upload(request)
        # decoding and inference are blocking: run them off the event loop
        result = await run_in_threadpool(predict_upload, predictor, lock, data, filename, annotated, decodes)
        if format == "sr":
            from pneumo.deploy.sr import upload_report

            try:
                report, warnings = await run_in_threadpool(upload_report, data, result, predictor.name)
            except (ValueError, KeyError, TypeError) as exc:  # a header highdicom refuses (pneumo.deploy.sr)
                raise HTTPException(422, f"{filename or 'upload'}: no SR for this header ({exc})") from None
            headers = {"X-Pneumo-Warnings": "; ".join(warnings)} if warnings else {}
            return Response(report, media_type="application/dicom", headers=headers)
        return JSONResponse(result)

    return app


async def read_body(request, limit: int) -> bytes:
    """The request body, read as it streams in and refused (413) as soon as it passes limit bytes:
    a chunked body has no Content-Length to check first, and one that lies is caught too."""
    from fastapi import HTTPException

    too_big = HTTPException(413, f"upload over the {MAX_UPLOAD_BYTES} byte limit (pneumo.limits.MAX_UPLOAD_BYTES)")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPException(400, "Content-Length is not a number") from None
    if declared > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_big
    return b"".join(chunks)


async def read_upload(request) -> tuple[bytes, str]:
    """The DICOM bytes and file name of a request: multipart field `file`, or JSON `dicom_base64`."""
    from fastapi import HTTPException
    from starlette.requests import Request

    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await read_body(request, MAX_MULTIPART_BODY_BYTES)

        async def replay():  # the form parser reads the capped body, never the socket
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        try:
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(400, "multipart upload needs a file part named 'file', with a filename")
            return await upload.read(), upload.filename or ""
        finally:
            await form.close()
    if content_type.startswith("application/json"):
        raw = await read_body(request, MAX_JSON_BODY_BYTES)
        try:
            body = json.loads(raw)
            data = base64.b64decode(body["dicom_base64"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise HTTPException(400, "JSON body needs 'dicom_base64': the DICOM file in base64") from None
        return data, str(body.get("filename", ""))
    raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with 'dicom_base64'")


def predict_upload(predictor, lock, data: bytes, filename: str, annotated: bool, decodes=None) -> dict:
    """One uploaded DICOM through the predictor: the response body (4xx for a bad upload)."""
    from fastapi import HTTPException

    from pneumo.boxes import box_records
    from pneumo.data.layout import decode_file

    if not data:
        raise HTTPException(400, "empty upload")
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"upload of {len(data)} bytes is over the {MAX_UPLOAD_BYTES} byte limit")
    # pydicom reads from a path; a temporary file keeps one reading code path for CLI and service
    with decodes or contextlib.nullcontext(), tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        tmp.write(data)
        tmp.flush()
        item = decode_file(tmp.name, predictor.image_size, keep_full=annotated)
    if item.error is not None:
        raise HTTPException(422, f"{filename or 'upload'}: {item.error}")
    with lock:
        probs, opacity = predictor.outputs(item.image[None], [item.meta])
    boxes, conf = predictor.boxes(probs[0], *item.shape, None if opacity is None else float(opacity[0]))
    patient_id = Path(filename).stem if filename else (item.meta["PatientID"] or "upload")
    result = {"patientId": patient_id, "boxes": box_records(boxes, conf), "image_size": list(item.shape),
              "model": predictor.name}
    if annotated:
        from pneumo.render import annotate

        buf = io.BytesIO()
        annotate(item.full, boxes, conf).save(buf, format="PNG")
        result["annotated_png_base64"] = base64.b64encode(buf.getvalue()).decode()
    return result


def serve(model, host: str = "127.0.0.1", port: int = 8000, threshold=None, min_box_area=None) -> None:
    import uvicorn

    uvicorn.run(create_app(model, threshold, min_box_area), host=host, port=port, log_level="info",
                limit_concurrency=MAX_CONNECTIONS)
