"""The sandbox API in its own process, so client and server never share an event loop."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SandboxInfo:
    base_url: str
    access_token: str

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v3")


class SandboxProcess:
    """``python -m batchjob sandbox --port 0 ...``; its first stdout line says where it is."""

    def __init__(self, *args: str, log: Path | None = None) -> None:
        self.args = ["--port", "0", *args]
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._info: SandboxInfo | None = None

    def start(self) -> SandboxInfo:
        stderr: Any = subprocess.DEVNULL
        if self.log is not None:
            stderr = self.log.open("ab")
        cmd = [sys.executable, "-m", "batchjob", "sandbox", *self.args]
        self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr)
        if self.log is not None:
            stderr.close()
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise RuntimeError(f"sandbox did not start (exit {self._proc.returncode}): {cmd}")
        data = json.loads(line)
        self._info = SandboxInfo(str(data["base_url"]), str(data["access_token"]))
        return self._info

    @property
    def info(self) -> SandboxInfo:
        assert self._info is not None, "sandbox not started"
        return self._info

    def get(self, path: str) -> Any:
        """GET a /_sandbox admin path; loopback only, so plain urllib is enough."""
        with urllib.request.urlopen(self.info.root + path, timeout=60) as resp:  # noqa: S310
            return json.load(resp)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(  # noqa: S310
            self.info.root + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
            return json.load(resp)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.get("/_sandbox/state")
        return state

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """Every recorded request from the ``since``-th on (the sandbox must record them: no
        --no-record-requests)."""
        records: list[dict[str, Any]] = []
        while True:
            page = self.get(f"/_sandbox/requests?since={since + len(records)}&limit=10000")
            records.extend(page["requests"])
            if since + len(records) >= page["total"] or not page["requests"]:
                return records

    def check_in(self, event_id: str, keys: list[str], batch: int = 1000) -> None:
        """Check ``keys`` in again through the API itself (the bench's own requests)."""
        url = f"{self.info.base_url}/events/{event_id}/check_in/tickets"
        headers = {
            "Authorization": f"Bearer {self.info.access_token}",
            "Content-Type": "application/json",
        }
        for start in range(0, len(keys), batch):
            body = json.dumps({"order_ticket_keys": keys[start : start + batch]}).encode()
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
            with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
                if resp.status != 204:
                    raise RuntimeError(f"check-in answered {resp.status}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SandboxProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
