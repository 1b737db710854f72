"""FastAPI service: ``POST /predict`` (multipart image), ``GET /health``, ``GET /`` (upload page).

Hostile input never kills it: uploads are size-limited before and while reading, images are refused by their
declared pixel count before decoding, and every error is a JSON body with a 4xx/5xx status. The front door
(``middleware.py``) checks the bearer token, admits at most ``max_concurrent`` + ``max_queue`` /predict
requests (503 + Retry-After beyond), cuts off slow uploads and writes the access log; ``limits.Gate`` runs the
work in ``max_concurrent`` threads under a decoded-bytes budget and a time limit (504). With an ONNX export
each request takes one of a pool of single-threaded sessions; PyTorch inference and Grad-CAM run one at a time
under a lock. Every answer says whether to trust it: the run's out-of-distribution score and verdict, and
``refer`` (out of distribution, or less confident than the cut that answers ``coverage`` of validation images).
"""
from __future__ import annotations

import asyncio
import base64
import copy
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from oncotransfer import __version__
from oncotransfer.data.readers import ImageReadError, ImageTooLargeError, SlideError
from oncotransfer.data.readers.quality import blank_reason
from oncotransfer.errors import ConfigError
from oncotransfer.serve.limits import Gate, ServeLimits, check_limit
from oncotransfer.serve.middleware import AccessLog, ServiceMiddleware

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("oncotransfer.serve")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "detail": message}, headers=headers)


def _image_error(e: ImageReadError, filename: str | None) -> HTTPException:
    msg = str(e)
    status = 413 if isinstance(e, ImageTooLargeError) else 415 if "not an image" in msg or isinstance(e, SlideError) else 400
    return HTTPException(status, f"{filename or 'upload'}: {msg.split(': ', 1)[-1]}")


def create_app(run_dir: str | Path, engine: str = "auto", max_upload_mb: float = 20,
               fold: int | None = None, limits: ServeLimits | None = None, token: str | None = None,
               access_log: str | Path | None = None, coverage: float | None = None,
               log: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app around one loaded model (``Predictor.from_run``): the ensemble of a multi-fold run's fold
    models by default, or fold ``fold`` alone. ``token``: require ``Authorization: Bearer <token>``;
    ``access_log``: a file to append JSON lines to, ``"-"`` for stdout, None for none; ``coverage``: the share
    of in-distribution images answered, the least confident rest referred (default ``DEFAULT_COVERAGE``);
    ``log``: the engine's one line (exporting on first use, or why PyTorch scores)."""
    from oncotransfer.data.images import decode_tensor, draft_size_for
    from oncotransfer.data.readers import probe
    from oncotransfer.infer.predict import DEFAULT_COVERAGE, Predictor
    coverage = DEFAULT_COVERAGE if coverage is None else float(coverage)
    if not 0 <= coverage <= 1:
        raise ConfigError(f"coverage {coverage:g}: expected a share of images between 0 and 1 (e.g. 0.9)")
    limits = limits or ServeLimits()
    check_limit("--max-upload-mb", max_upload_mb)
    access = AccessLog(access_log)  # a bad --log-file is said before the model loads
    predictor = Predictor.from_run(run_dir, engine, fold, log=log)
    limit = int(max_upload_mb * 1024 * 1024)
    lock = threading.Lock()  # torch inference and Grad-CAM one at a time: torch uses every core, Grad-CAM hooks
    engines = _engine_pool(predictor)
    gate = Gate(limits.concurrency(), limits.max_queue, int(limits.max_decode_mb * 2**20))
    trust = _trust_info(predictor, coverage)
    app = FastAPI(title="oncotransfer", version=__version__,
                  description=f"{predictor.name}: {', '.join(predictor.classes)}")
    app.state.predictor = predictor
    app.state.engines = engines
    app.state.gate = gate
    app.state.limits = limits
    app.add_middleware(ServiceMiddleware, gate=gate, token=token, upload_limit=limit, max_upload_mb=max_upload_mb,
                       body_timeout_s=limits.body_timeout_s, access_log=access)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        missing = [".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()]
        return _error(422, "expected a multipart/form-data upload with the image in a field named 'file' "
                           f"(e.g. curl -F file=@image.jpg .../predict); problem with: {', '.join(missing)}")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health(request: Request) -> dict:
        ready = gate.ready()
        if not request.state.authorized:
            # Auth on and no valid token: enough for a load balancer's readiness probe, nothing about the model
            # (its name and classes say what a hospital works on).
            return {"status": "ok", "ready": ready, "auth_required": True}
        return {"status": "ok", "ready": ready, "auth_required": request.state.auth_required,
                "model": predictor.name, "version": __version__, "engine": predictor.engine,
                "backbone": predictor.meta["backbone"]["name"], "classes": predictor.classes,
                "input_size": predictor.size, "max_upload_mb": max_upload_mb, "max_pixels": limits.max_pixels,
                "timeout_s": limits.timeout_s, "fold": fold,
                "ensemble": predictor.describe(), "members": predictor.members,
                "temperature": predictor.temperature, "calibrated": predictor.ensemble.calibrated,
                **trust, "load": gate.load()}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def infer(data: bytes, explain: bool) -> dict:
        """Decode and classify (in a worker thread)."""
        img, t = decode_tensor(data, predictor.size, max_pixels=limits.max_pixels, frame=predictor.dicom_frame,
                               us_region=predictor.us_region)  # a grey upload stays one band until resized
        batch = t.unsqueeze(0)
        if engines is not None and not explain:
            worker = engines.get()  # a single-threaded ONNX session of its own; the others serve other requests
            try:
                probs, ood = worker.predict_with_ood(batch)
            finally:
                engines.put(worker)
            k, overlay = int(probs[0].argmax()), None
        else:
            with lock:
                probs, ood = predictor.predict_with_ood(batch)
                k = int(probs[0].argmax())
                overlay = None
                if explain:
                    from oncotransfer.infer.explain import heatmap, overlay_png
                    heat = heatmap(predictor.model, predictor.normalised(batch), k)
                    overlay = base64.b64encode(overlay_png(img.convert("RGB"), heat)).decode("ascii")
        flags = predictor.in_distribution(ood)
        refer, reasons = predictor.referrals(probs, ood, coverage)
        # a blank frame (a cleared screen, a failed export) is scored like any image, so the answer says so
        blank = blank_reason(t.numpy())
        if blank:
            refer[0], reasons[0] = True, "; ".join(filter(None, [reasons[0], f"blank input: {blank}"]))
        return {"model": predictor.name, "version": __version__, "engine": predictor.engine,
                "classes": predictor.classes,
                "probabilities": {c: float(p) for c, p in zip(predictor.classes, probs[0])},
                "predicted": predictor.classes[k],
                "ood_score": None if ood is None else float(ood[0]),
                "in_distribution": None if flags is None else bool(flags[0]),
                "ood_threshold": trust["ood"]["threshold"] if trust["ood"] else None,
                "refer": bool(refer[0]), "refer_reason": reasons[0], "blank": blank, "overlay_png": overlay}

    @app.post("/predict")
    async def predict(request: Request,
                      file: UploadFile = File(..., description="the image (PNG, JPEG, TIFF, ...)"),
                      explain: bool = Query(False, description="also return a Grad-CAM overlay PNG (base64)")):
        ticket = request.state.ticket  # admitted by the middleware
        data = await file.read(limit + 1)  # never more than limit + 1 bytes in memory
        if len(data) > limit:
            raise HTTPException(413, f"upload exceeds the limit of {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:  # the header alone (in a thread: some formats parse a while): a 9000 x 9000 PNG stops here
            need = (await run_in_threadpool(probe, data, limits.max_pixels, draft_size_for(predictor.size))
                    ).peak_bytes
        except ImageReadError as e:
            raise _image_error(e, file.filename) from None
        if need > gate.budget:
            raise HTTPException(413, f"{file.filename or 'upload'}: decoding would take {need / 2**20:.0f} MB, "
                                     f"more than the service's budget of {gate.budget / 2**20:.0f} MB")
        if not gate.reserve(ticket, need):
            wait = gate.retry_after()
            return _error(503, f"service busy: decoding memory in use ({gate.budget / 2**20:.0f} MB); retry "
                               f"in {wait} s", {"Retry-After": str(wait)})
        try:
            return await gate.run(ticket, lambda: infer(data, explain), time.monotonic() + limits.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"no answer within the service's time limit of {limits.timeout_s:g} s; "
                               "the service is overloaded or the image too slow to process")
        except ImageReadError as e:  # found only while decoding (a truncated body, a bad stream)
            raise _image_error(e, file.filename) from None

    return app


def _trust_info(predictor, coverage: float) -> dict:
    """What /health says about trusting answers: the detector (None for a run without one; its threshold None
    when no fold had validation images of its own) and the confidence cut of ``coverage`` (None: unknown)."""
    ood = predictor.ood
    return {"ood": None if ood is None else {"detector": ood.kind, "threshold": ood.threshold,
                                              "pass_rate": ood.pass_rate},
            "coverage": coverage, "confidence_cut": predictor.confidence_cut(coverage)}


def _engine_pool(predictor) -> "queue.Queue | None":
    """One single-threaded ONNX Runtime session per core, so concurrent requests run side by side instead of
    queueing for one two-threaded session (2 cores, EfficientNet-Lite0, 4 clients: 34 -> 41-45 requests/s)."""
    if predictor.session is None:
        return None
    from oncotransfer.runtime import ort_session, usable_cores
    cores = usable_cores()
    pool: queue.Queue = queue.Queue(maxsize=max(1, cores))
    for _ in range(max(1, cores)):
        worker = copy.copy(predictor)
        worker.session = ort_session(predictor.onnx_path, threads=1)
        pool.put(worker)
    return pool
