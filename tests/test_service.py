"""The lookup service, started for real (``rdcd serve`` in a subprocess on 127.0.0.1, a free port)."""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import picture
from rdcd.store import ReferenceStore

READ, WRITE = "read-key-0123456789abcdef", "write-key-0123456789abcdef"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def jpeg(seed: int, size=(96, 80)) -> bytes:
    buffer = io.BytesIO()
    picture(seed, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store: Path, *extra: str, keys: str = f"read:{READ},write:{WRITE}"):
        self.store, self.port = store, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, RDCD_API_KEYS=keys, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rdcd", "serve", "--index", str(store), "--port", str(self.port), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rdcd serve exited: {self.process.stdout.read().decode()}")
            try:
                if requests.get(self.url + "/v1/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError("rdcd serve did not start within 60 s")

    def post(self, path, key=READ, **kwargs):
        return requests.post(self.url + path, headers={"X-API-Key": key} if key else {}, timeout=60, **kwargs)

    def add(self, ids, seeds, key=WRITE):
        files = [("images", (f"{i}.jpg", jpeg(s))) for i, s in zip(ids, seeds)]
        return self.post("/v1/references", key=key, files=files, data={"ids": list(ids)})

    def match(self, seed, key=READ, **data):
        return self.post("/v1/match", key=key, files=[("images", ("q.jpg", jpeg(seed)))], data=data)

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


def new_store(folder: Path) -> Path:
    path = folder / "refs.store"
    ReferenceStore.create(path, "pdq", threshold=0.9).close()
    return path


@pytest.fixture
def store(tmp_path):
    return new_store(tmp_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the quick tests (each starts in seconds: torch and the model load); ids differ per test."""
    running = Server(new_store(tmp_path_factory.mktemp("service")), "--max-body-mb", "1", "--max-pixels", "4000000")
    yield running
    running.stop()


def test_auth_keys_and_roles(server):
    assert server.match(1, key=None).status_code == 401
    assert server.match(1, key="not-a-key-at-all-xxxxxx").status_code == 401
    assert server.add(["r1"], [1], key=READ).status_code == 403
    assert server.add(["r1"], [1]).status_code == 201
    hit = server.match(1, k=1).json()["results"][0]
    assert hit["matches"][0] == {"reference_id": "r1", "score": 1.0, "copy": True} and hit["copy"] is True
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 401
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {READ}"}, timeout=5).text
    assert 'rdcd_requests_total{route="/v1/match",status="401"} 2' in metrics and "rdcd_references " in metrics
    assert requests.get(server.url + "/docs", timeout=5).status_code == 200


def test_bad_uploads_are_400_or_413(server):
    def status(data: bytes):
        response = server.post("/v1/match", files=[("images", ("x.jpg", data))])
        return response.status_code, response.json()["detail"]

    assert status(b"") == (400, "x.jpg: empty file (0 bytes)")
    assert status(b"hello, not an image")[0] == 400
    truncated = status(jpeg(2, (400, 300))[:900])
    assert truncated[0] == 400 and "truncated" in truncated[1]
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # 25 megapixels in ~25 kB
    code, detail = status(bomb.getvalue())
    assert code == 400 and "limit of 4000000" in detail
    code, detail = status(b"\xff" * (2 * 1024 * 1024))
    assert code == 413 and "limit of 1048576 bytes" in detail
    assert server.post("/v1/match", json={"descriptors": [[0.5] * 10]}).status_code == 400
    assert server.post("/v1/match", json={"descriptors": [["a"] * 64]}).status_code == 400  # not numbers
    assert server.post("/v1/match", json={"descriptors": [{"x": 1}]}).status_code == 400
    assert "model 'phash'" in server.post("/v1/match", json={"descriptors": [[0.1] * 256], "model": "phash"}).text
    assert server.post("/v1/match", data={"k": "3"}).status_code == 400  # no images


def test_duplicate_id_and_remove(server):
    assert server.add(["a", "b"], [1, 2]).status_code == 201
    response = server.add(["c", "a"], [3, 4])
    assert response.status_code == 409 and "already in the store" in response.json()["detail"]
    assert requests.delete(server.url + "/v1/references/a", headers={"X-API-Key": WRITE}, timeout=5).status_code == 200
    assert requests.delete(server.url + "/v1/references/a", headers={"X-API-Key": WRITE}, timeout=5).status_code == 404
    present = set(ReferenceStore.open(server.store).backend.vectors()[0])
    assert "b" in present and not {"a", "c"} & present  # c, refused with a, was never added


def test_refuses_to_start_without_keys_or_on_the_wrong_model(store, tmp_path, monkeypatch, capsys):
    from rdcd.cli import main
    from rdcd.extract import extract

    monkeypatch.delenv("RDCD_API_KEYS", raising=False)
    assert main(["serve", "--index", str(store)]) == 1
    assert "no API keys" in capsys.readouterr().err
    assert main(["serve", "--index", str(store), "--insecure-no-auth", "--host", "0.0.0.0"]) == 1
    assert "loopback address only" in capsys.readouterr().err
    monkeypatch.setenv("RDCD_API_KEYS", "read:short")
    assert main(["serve", "--index", str(store)]) == 1
    assert "16+ characters" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    picture(1).save(folder / "x.jpg")
    extract("phash", folder, output=tmp_path / "phash.h5", progress=False)
    assert main(["index", "add", "--index", str(store), "--descriptors", str(tmp_path / "phash.h5")]) == 1
    assert "descriptors of dimension 64" in capsys.readouterr().err


@pytest.mark.slow
def test_concurrent_adds_and_matches(store):
    """8 clients x 50 requests (half adds of new ids, half matches): no 500, every acknowledged add is kept."""
    server = Server(store, "--queue-size", "8", "--max-images", "8")
    acknowledged, statuses, lock = [], [], threading.Lock()

    def client(c):
        for n in range(50):
            reference_id = f"c{c}-{n}"
            response = server.add([reference_id], [1000 + c * 50 + n]) if n % 2 else server.match(c * 50 + n)
            with lock:
                statuses.append(response.status_code)
                if response.status_code == 201:
                    acknowledged.append(reference_id)
                if response.status_code == 503:
                    assert response.headers["Retry-After"] == "1"

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    server.stop()
    assert len(statuses) == 400 and set(statuses) <= {200, 201, 503}, sorted(set(statuses))
    assert statuses.count(201) > 0 and statuses.count(200) > 0
    reopened = ReferenceStore.open(store)
    assert len(reopened) == len(acknowledged) and all(i in reopened for i in acknowledged)


@pytest.mark.slow
def test_kill_9_during_adds_keeps_every_acknowledged_add(store):
    server = Server(store)
    acknowledged, stop = [], threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            try:
                response = server.add([f"k{n}a", f"k{n}b"], [2 * n, 2 * n + 1])
            except requests.RequestException:
                return
            if response.status_code == 201:
                acknowledged.extend([f"k{n}a", f"k{n}b"])
            n += 1

    threads = [threading.Thread(target=writer) for _ in range(2)]
    [t.start() for t in threads]
    while len(acknowledged) < 40:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    stop.set()
    [t.join() for t in threads]
    restarted = Server(store)
    try:
        health = requests.get(restarted.url + "/v1/health", timeout=5).json()
        reopened = ReferenceStore.open(store)
        ids = reopened.backend.vectors()[0]
        assert all(i in reopened for i in acknowledged)
        assert health["references"] == len(ids) == len(reopened)
        assert all(f"{i[:-1]}{'b' if i.endswith('a') else 'a'}" in ids for i in ids)  # adds of two: both or none
        assert restarted.add(["after"], [99999]).status_code == 201
    finally:
        restarted.stop()


def test_embedder_refuses_work_beyond_its_queue():
    """The bounded queue behind 503: a request whose images do not all fit is refused whole."""
    import numpy as np

    from rdcd.models.hashes import PHashModel
    from rdcd.server import Busy, Embedder

    release = threading.Event()

    class Held(PHashModel):  # phash, held until the test lets the batch go
        def embed(self, images):
            release.wait(10)
            return super().embed(images)

    embedder = Embedder(Held(), queue_size=3, batch_size=1, wait_s=0)
    image = np.zeros((32, 32, 3), np.uint8)
    first = embedder.submit([image])  # taken by the worker, which waits
    time.sleep(0.2)
    queued = embedder.submit([image, image, image])
    with pytest.raises(Busy):
        embedder.submit([image])
    release.set()
    assert [f.result(timeout=10).shape for f in first + queued] == [(64,)] * 4
    assert embedder.submit([image])[0].result(timeout=10).shape == (64,)


def test_a_timed_out_request_is_dropped_and_the_worker_keeps_going():
    """A request whose images wait past the timeout gets Busy (503); its jobs are skipped, not embedded."""
    import numpy as np

    from rdcd.models.hashes import PHashModel
    from rdcd.server import Busy, Embedder, ServiceConfig, ServiceState

    release = threading.Event()

    class Held(PHashModel):
        def embed(self, images):
            release.wait(10)
            return super().embed(images)

    state = ServiceState.__new__(ServiceState)  # the embedding part of a service, without a store
    state.config = ServiceConfig(timeout_s=0.2)
    state.embedder = Embedder(Held(), queue_size=8, batch_size=1, wait_s=0)
    image = np.zeros((32, 32, 3), np.uint8)
    blocker = state.embedder.submit([image])
    time.sleep(0.1)
    with pytest.raises(Busy):
        state.embed([image, image])  # waits behind the held batch, times out
    release.set()
    assert blocker[0].result(timeout=10).shape == (64,)
    assert state.embed([image]).shape == (1, 64)  # the worker survived the cancelled jobs
    assert state.embedder.embedded == 2  # the blocker and the last one; the timed-out two were skipped


def test_service_settings_that_cannot_serve_are_refused():
    from rdcd.server import ServiceConfig

    with pytest.raises(ValueError, match="no API keys"):
        ServiceConfig().check()
    with pytest.raises(ValueError, match="raise --queue-size"):
        ServiceConfig(auth=False, queue_size=8, max_images=64).check()
    ServiceConfig(auth=False).check()

