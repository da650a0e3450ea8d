"""Start ``python -m fastddpm.app`` on 127.0.0.1 and a free port for a test, and stop it after.

The server runs in its own process (Gradio reads its environment at import, and a process is the
unit that must clean up after itself): ``app_server()`` yields once the server says it is serving
(bounded wait), then sends SIGTERM and waits (bounded), killing it if it does not stop."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

START_TIMEOUT = 120.0       # warm-up (torch's first step, the engines) on a loaded 2-core machine
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    temp_root: str
    proc: subprocess.Popen
    output: list = field(default_factory=list)

    def log(self) -> str:
        return "".join(self.output[-60:])


@contextlib.contextmanager
def app_server(*args: str):
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastddpm.app", "--host", "127.0.0.1", "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    ready = threading.Event()
    found: dict = {}

    def read():
        for line in proc.stdout:
            output.append(line)
            m = re.search(r"serving on (\S+) \(temporary files in (\S+)\)", line)
            if m:
                found.update(url=m.group(1) + "/", root=m.group(2))
                ready.set()
        ready.set()      # the process ended
    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.wait(0.2) and time.monotonic() < deadline:
            pass
        if "url" not in found:
            raise RuntimeError(f"the app did not start in {START_TIMEOUT:.0f} s:\n{''.join(output[-40:])}")
        yield AppServer(url=found["url"], temp_root=found["root"], proc=proc, output=output)
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
