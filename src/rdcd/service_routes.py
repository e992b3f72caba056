"""The routes of the lookup service (``rdcd.server.create_app``)."""
from __future__ import annotations

import time
from pathlib import PurePath

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile

from rdcd.images import ImageLoadError
from rdcd.store import DuplicateIdError, StoreError

from .server import Busy, ServiceState

MULTIPART_IMAGES = {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "k": {"type": "integer"}, "threshold": {"type": "number"}}}}}
JSON_DESCRIPTORS = {"application/json": {"schema": {"type": "object", "required": ["descriptors"], "properties": {
    "descriptors": {"type": "array", "description": "base64 little-endian float32, or lists of numbers",
                    "items": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "number"}}]}},
    "ids": {"type": "array", "items": {"type": "string"}}, "model": {"type": "string"},
    "k": {"type": "integer"}, "threshold": {"type": "number"}}}}}
ADD_IMAGES = {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "ids": {"type": "array", "items": {"type": "string"}, "description": "one per image (default: file stems)"},
    "label": {"type": "string"}, "upsert": {"type": "boolean"}}}}}


def add_routes(app: FastAPI, state: ServiceState) -> None:
    store, config = state.store, state.config

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - counted as the 500 the server answers
            state.metrics.observe(request.url.path, 500, time.perf_counter() - start)
            raise
        route = request.scope.get("route")
        state.metrics.observe(getattr(route, "path", "other"), response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return JSONResponse({"detail": "the embedding queue is full; retry shortly"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(ImageLoadError)
    async def bad_image(request, exc):
        return JSONResponse({"detail": f"{exc.path}: {exc.reason}"}, status_code=400)

    @app.exception_handler(DuplicateIdError)
    async def duplicate(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StoreError)
    async def bad_request(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def require(request: Request, role: str) -> None:
        header = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key") or (header[7:] if header.lower().startswith("bearer ") else None)
        got = state.role(key)
        if got is None:
            raise HTTPException(401, "missing or unknown API key (X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})
        if role == "write" and got != "write":
            raise HTTPException(403, "this API key may only read; adding and removing need a read-write key")

    async def read_uploads(request: Request, form) -> list[tuple[str, np.ndarray]]:
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        if not files:
            raise StoreError("no images: send them as multipart form field 'images'")
        if len(files) > config.max_images:
            raise StoreError(f"{len(files)} images in one request; the limit is {config.max_images}")
        named = [(PurePath(f.filename or f"image{i}").name, await f.read()) for i, f in enumerate(files)]
        return [(name, await run_in_threadpool(state.decode, name, data)) for name, data in named]

    @app.post("/v1/match", openapi_extra={"requestBody": {"content": {**MULTIPART_IMAGES, **JSON_DESCRIPTORS}}},
              summary="top-k references of each uploaded image or descriptor, with copy decisions")
    async def match(request: Request):
        require(request, "read")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise StoreError("the JSON body cannot be parsed") from None
            if not isinstance(body, dict) or not isinstance(body.get("descriptors"), list):
                raise StoreError("a JSON body needs 'descriptors': a list of base64 float32 strings or number lists")
            if len(body["descriptors"]) > config.max_images:
                raise StoreError(f"{len(body['descriptors'])} descriptors in one request; the limit is {config.max_images}")
            vectors = state.parse_descriptors(body["descriptors"], body.get("model"))
            names = [str(i) for i in body.get("ids") or range(len(vectors))]
            k, threshold = body.get("k"), body.get("threshold")
        else:
            form = await request.form()
            uploads = await read_uploads(request, form)
            names = [n for n, _ in uploads]
            vectors = await run_in_threadpool(state.embed, [a for _, a in uploads])
            k, threshold = form.get("k"), form.get("threshold")
        if len(names) != len(vectors):
            raise StoreError(f"{len(names)} ids for {len(vectors)} descriptors")
        k = _number(k, int, "k", store.config.k)
        threshold = _number(threshold, float, "threshold", store.threshold)
        if not 1 <= k <= 1000:
            raise StoreError(f"k must be between 1 and 1000; got {k}")
        keys = [f"{i}" for i in range(len(names))]  # positions, so two uploads of one name stay apart
        predictions = await run_in_threadpool(store.query, keys, vectors, k)
        results = [{"query": name, "matches": []} for name in names]
        for q, r, s in predictions.rows():
            hit = {"reference_id": r, "score": round(float(s), 6)}
            if threshold is not None:
                hit["copy"] = bool(s >= threshold)
            results[int(q)]["matches"].append(hit)
        for result in results:
            result["copy"] = None if threshold is None else any(m["copy"] for m in result["matches"])
        return {"model": store.record["rdcd.model"], "k": k, "threshold": threshold, "results": results}

    @app.post("/v1/references", status_code=201, openapi_extra={"requestBody": {"content": ADD_IMAGES}},
              summary="add uploaded images under the given ids (read-write key)")
    async def add(request: Request):
        require(request, "write")
        form = await request.form()
        uploads = await read_uploads(request, form)
        ids = [str(i) for i in form.getlist("ids")] or [PurePath(n).stem for n, _ in uploads]
        if len(ids) != len(uploads):
            raise StoreError(f"{len(ids)} ids for {len(uploads)} images: give one 'ids' field per image")
        upsert = str(form.get("upsert", "false")).lower() in ("1", "true", "yes")
        label = form.get("label")
        vectors = await run_in_threadpool(state.embed, [a for _, a in uploads])
        metadata = [{"source": name, **({"label": str(label)} if label else {})} for name, _ in uploads]
        await run_in_threadpool(store.add, ids, vectors, metadata, upsert)
        return {"added": ids, "references": len(store)}

    @app.delete("/v1/references/{reference_id}", summary="remove one reference (read-write key)")
    async def remove(reference_id: str, request: Request):
        require(request, "write")
        if not await run_in_threadpool(store.remove, [reference_id]):
            raise HTTPException(404, f"no reference {reference_id!r} in the store")
        return {"removed": reference_id, "references": len(store)}

    @app.get("/v1/health", summary="liveness: model and store size (no key needed)")
    async def health():
        return {"status": "ok", "model": store.record["rdcd.model"], "references": len(store),
                "queue": state.embedder.jobs.qsize()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (read key)")
    async def metrics(request: Request):
        require(request, "read")
        return state.metrics.text(store, state.embedder)


def _number(value, kind, name: str, default):
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise StoreError(f"{name} must be a number; got {value!r}") from None
