"""A real Alertmanager (Debian's ``prometheus-alertmanager``) for tests: started on a free
loopback port with a temporary storage dir and clustering off, routing every alert (one group
per label set, no group_wait) to a webhook receiver of the test's own, so a test sees both what
Alertmanager holds (``alerts()``, its v2 API) and what it delivers (``delivered``)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.processes import wait_for
from tests.servers import running_asgi
from tests.system import require

START_TIMEOUT_S = 20.0

CONFIG = """\
route:
  receiver: test
  group_by: ['...']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: {webhook}
        send_resolved: true
"""


def free_port() -> int:
    # Alertmanager binds its own socket, so it cannot be handed one: a port the OS just gave
    # out is the nearest thing (Go listens with SO_REUSEADDR, so a restart gets it back).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Alertmanager:
    binary: str
    workdir: Path
    webhook: str
    port: int = field(default_factory=free_port)
    delivered: list[dict[str, Any]] = field(default_factory=list)  # its webhook messages
    _process: subprocess.Popen[bytes] | None = None
    _starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it with a fresh storage dir (what a restart on a new host or disk is)."""
        self._starts += 1
        storage = self.workdir / f"storage-{self._starts}"
        storage.mkdir(parents=True)
        config = self.workdir / "alertmanager.yml"
        config.write_text(CONFIG.format(webhook=self.webhook))
        log = (self.workdir / f"alertmanager-{self._starts}.log").open("wb")
        self._process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.path={storage}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._ready, what="alertmanager to be ready", timeout_s=START_TIMEOUT_S)

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            text = (self.workdir / f"alertmanager-{self._starts}.log").read_text()
            raise AssertionError(f"alertmanager exited: {text}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts it holds that are active (neither resolved nor silenced)."""
        response = httpx.get(f"{self.url}/api/v2/alerts", params={"active": "true"}, timeout=5)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return [a for a in alerts if a["status"]["state"] == "active"]


@contextmanager
def running_alertmanager(workdir: Path) -> Iterator[Alertmanager]:
    binary = require("prometheus-alertmanager")
    lock = threading.Lock()
    delivered: list[dict[str, Any]] = []

    async def receive(request: Request) -> JSONResponse:
        body = await request.json()
        with lock:
            delivered.append(body)
        return JSONResponse({})

    app = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
    with running_asgi(app) as hook_url:
        workdir.mkdir(parents=True, exist_ok=True)
        manager = Alertmanager(binary, workdir, f"{hook_url}/hook", delivered=delivered)
        manager.start()
        try:
            yield manager
        finally:
            manager.stop()
