"""The lookup service behind ``rdcd serve``: a FastAPI app over one ``ReferenceStore``.

Routes (OpenAPI at /docs): ``POST /v1/match`` (uploaded images, or descriptors as JSON),
``POST /v1/references`` (add uploaded images under given ids), ``DELETE /v1/references/{id}``,
``GET /v1/health`` and ``GET /metrics`` (Prometheus text). Requests carry an API key
(``X-API-Key`` or ``Authorization: Bearer``); read keys may match, write keys may also add and
remove. Uploads are decoded in the request threads; one worker thread embeds whatever images are
waiting, up to a batch, so concurrent requests share model calls. When the queue of images is
full the request gets 503 with Retry-After instead of waiting without bound.
"""
from __future__ import annotations

import base64
import hmac
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from rdcd.images import decode_image, resize_square
from rdcd.store import ReferenceStore, StoreError

#: service default: 50 megapixels, far above any photo a camera makes, far below a bomb's
SERVICE_MAX_PIXELS = 50_000_000


@dataclass
class ServiceConfig:
    read_keys: list[str] = field(default_factory=list)
    write_keys: list[str] = field(default_factory=list)
    auth: bool = True  # False only with --insecure-no-auth on a loopback address
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = SERVICE_MAX_PIXELS
    max_images: int = 64  # images (or descriptors) per request
    queue_size: int = 64  # images waiting to be embedded; beyond it, 503
    batch_size: int = 32
    batch_wait_s: float = 0.005  # how long the worker waits for more images to fill a batch
    timeout_s: float = 60.0

    def check(self) -> None:
        """Settings that cannot serve, refused before the store and its model are loaded."""
        if self.auth and not (self.read_keys or self.write_keys):
            raise ValueError("no API keys: set RDCD_API_KEYS='read:KEY,write:KEY' or --api-keys-file FILE "
                             "(--insecure-no-auth for a loopback address)")
        if min(self.max_images, self.queue_size, self.batch_size) < 1:
            raise ValueError("the images per request, queue size and batch size must each be at least 1")
        if self.queue_size < self.max_images:  # a full-size request would be refused even by an idle server
            raise ValueError(f"the queue ({self.queue_size} images) must hold a whole request "
                             f"({self.max_images} images): raise --queue-size")


class Busy(Exception):
    pass


class Embedder:
    """A worker thread embedding queued images in batches; ``submit`` refuses work beyond ``queue_size``."""

    def __init__(self, model, queue_size: int, batch_size: int, wait_s: float):
        self.model, self.batch_size, self.wait_s = model, batch_size, wait_s
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._admit = threading.Lock()
        self.embedded = 0
        self.batches = 0
        threading.Thread(target=self._run, name="rdcd-embedder", daemon=True).start()

    def submit(self, arrays: list[np.ndarray]) -> list[Future]:
        with self._admit:  # all of a request's images or none of them
            if self.jobs.qsize() + len(arrays) > self.jobs.maxsize:
                raise Busy()
            futures = [Future() for _ in arrays]
            for job in zip(arrays, futures):
                self.jobs.put_nowait(job)
        return futures

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.batch_size:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            batch = [(a, f) for a, f in batch if f.set_running_or_notify_cancel()]  # cancelled: timed out
            if not batch:
                continue
            try:
                vectors = self.model.embed(np.stack([a for a, _ in batch]))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    future.set_exception(e)
                continue
            self.embedded += len(batch)
            self.batches += 1
            for (_, future), vector in zip(batch, vectors):
                future.set_result(vector)


class Metrics:
    """The few Prometheus counters the service exports, in the text exposition format."""

    def __init__(self):
        self.requests = defaultdict(int)  # (route, status) -> count
        self.seconds = defaultdict(float)  # route -> total seconds
        self.counts = defaultdict(int)
        self.lock = threading.Lock()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[route, status] += 1
            self.seconds[route] += seconds
            self.counts[route] += 1

    def text(self, store: ReferenceStore, embedder: Embedder) -> str:
        lines = ["# TYPE rdcd_requests_total counter"]
        with self.lock:
            lines += [f'rdcd_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            lines += ["# TYPE rdcd_request_seconds summary"]
            for route in sorted(self.counts):
                lines += [f'rdcd_request_seconds_sum{{route="{route}"}} {self.seconds[route]:.6f}',
                          f'rdcd_request_seconds_count{{route="{route}"}} {self.counts[route]}']
        lines += ["# TYPE rdcd_references gauge", f"rdcd_references {len(store)}",
                  "# TYPE rdcd_queue_images gauge", f"rdcd_queue_images {embedder.jobs.qsize()}",
                  "# TYPE rdcd_embedded_images_total counter", f"rdcd_embedded_images_total {embedder.embedded}",
                  "# TYPE rdcd_embed_batches_total counter", f"rdcd_embed_batches_total {embedder.batches}"]
        return "\n".join(lines) + "\n"


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = f'{{"detail":"request body exceeds the limit of {self.limit} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(store: ReferenceStore, config: ServiceConfig | None = None):
    """The FastAPI app serving ``store``; its model is loaded here, before the first request."""
    from fastapi import FastAPI

    from rdcd.service_routes import add_routes

    config = config or ServiceConfig()
    config.check()
    app = FastAPI(title="rdcd lookup service", version="1",
                  description=f"Copy detection against {len(store)} references ({store.record['rdcd.model']}).")
    state = ServiceState(store, config)
    add_routes(app, state)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.state.rdcd = state
    return app


class ServiceState:
    def __init__(self, store: ReferenceStore, config: ServiceConfig):
        self.store, self.config = store, config
        self.embedder = Embedder(store.model, config.queue_size, config.batch_size, config.batch_wait_s)
        self.metrics = Metrics()

    def role(self, key: str | None) -> str | None:
        """'write', 'read' or None; every key is compared, in constant time, whatever matches first."""
        if not self.config.auth:
            return "write"
        if not key:
            return None
        given = key.encode()
        write = any([hmac.compare_digest(given, k.encode()) for k in self.config.write_keys])
        read = any([hmac.compare_digest(given, k.encode()) for k in self.config.read_keys])
        return "write" if write else "read" if read else None

    def decode(self, name: str, data: bytes) -> np.ndarray:
        model = self.store.model
        draft = model.input_size if self.store.config.draft else None
        return resize_square(decode_image(data, name, self.config.max_pixels, draft), model.input_size)

    def embed(self, arrays: list[np.ndarray]) -> np.ndarray:
        futures = self.embedder.submit(arrays)
        try:
            return np.stack([f.result(timeout=self.config.timeout_s) for f in futures])
        except FutureTimeout:  # the worker is behind: drop what has not started, ask to retry (503)
            for f in futures:
                f.cancel()
            raise Busy() from None

    def parse_descriptors(self, values, model: str | None) -> np.ndarray:
        if model is not None and model != self.store.record["rdcd.model"]:
            raise StoreError(f"descriptors of model {model!r}; this store holds {self.store.record['rdcd.model']!r}")
        rows = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                try:
                    raw = base64.b64decode(value, validate=True)
                except ValueError:
                    raise StoreError(f"descriptor {i}: not valid base64") from None
                if len(raw) % 4:
                    raise StoreError(f"descriptor {i}: {len(raw)} bytes is not a whole number of float32 values")
                rows.append(np.frombuffer(raw, "<f4"))
            else:
                try:
                    rows.append(np.asarray(value, np.float32).ravel())
                except (TypeError, ValueError):
                    raise StoreError(f"descriptor {i}: not a list of numbers (or a base64 float32 string)") from None
        for i, row in enumerate(rows):
            if row.shape != (self.store.dim,):
                raise StoreError(f"descriptor {i} has {row.size} values; the store's model "
                                 f"{self.store.record['rdcd.model']} makes {self.store.dim}")
            if not np.isfinite(row).all():
                raise StoreError(f"descriptor {i} holds NaN or infinite values")
        return np.stack(rows) if rows else np.zeros((0, self.store.dim), np.float32)

