"""A server in a subprocess, started and stopped cleanly (tests, notebooks, benchmarks).

``ServerProcess.splitlab(args)`` runs ``python -m splitlab.serve --port 0 ARGS`` and waits for
its ``listening on http://HOST:PORT/v1`` line; ``ServerProcess.start(argv, url, ready_url)``
runs any command (``transformers serve ...``) and waits until ``ready_url`` answers 200. Its
output is read by a thread (the pipe never fills) and kept in ``lines`` (the last 400).
``stop()`` sends SIGTERM, waits, and kills what did not exit; a ``with`` block stops it too.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from splitlab.errors import WorkerError

LISTENING = re.compile(r"listening on (http://\S+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a server that cannot take ``--port 0``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``port`` (connections the server closed may linger in TIME_WAIT:
    ``SO_REUSEADDR`` binds past those, never past a listening socket)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class ServerProcess:
    """One server subprocess; see the module docstring."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.argv = list(argv)
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._seen = threading.Condition()
        self.url: str | None = None
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=cwd, bufsize=1)
        self._reader = threading.Thread(target=self._read, name="server-output", daemon=True)
        self._reader.start()

    @classmethod
    def splitlab(cls, args: list[str], timeout_s: float = 300.0, env: dict[str, str] | None = None
                 ) -> "ServerProcess":
        """``splitlab serve --port 0 ARGS`` with this interpreter, once it listens."""
        server = cls([sys.executable, "-m", "splitlab.serve", "--port", "0", *args], env=env)
        try:
            server.url = server.wait_for(LISTENING, timeout_s).group(1)
        except BaseException:
            server.stop()
            raise
        return server

    @classmethod
    def start(cls, argv: list[str], url: str, ready_url: str, timeout_s: float = 300.0,
              env: dict[str, str] | None = None) -> "ServerProcess":
        """Any server command (``url``: its OpenAI base URL), once ``ready_url`` answers 200."""
        server = cls(argv, env=env)
        server.url = url
        try:
            server.wait_http(ready_url, timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        self.proc.stdout.close()

    def output(self, last: int = 40) -> str:
        return "\n".join(list(self.lines)[-last:])

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        """The first output line matching ``pattern``; WorkerError if the process ends or time runs out."""
        deadline = time.monotonic() + timeout_s
        checked = 0
        with self._seen:
            while True:
                lines = list(self.lines)
                for line in lines[checked:]:
                    match = pattern.search(line)
                    if match:
                        return match
                checked = len(lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise WorkerError(f"the server exited with status {self.proc.returncode}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerError(f"the server did not print {pattern.pattern!r} within {timeout_s:g} s:\n"
                                      f"{self.output()}")
                self._seen.wait(min(left, 0.5))

    def wait_http(self, url: str, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise WorkerError(f"the server exited with status {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(url, timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise WorkerError(f"{url} did not answer 200 within {timeout_s:g} s:\n{self.output()}")
            time.sleep(0.25)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the server, wait up to ``timeout_s``, kill it (and what it started) if it is
        still there; its exit status (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(10.0)
        self._reader.join(10.0)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
