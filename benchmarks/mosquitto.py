"""A real Mosquitto broker on a free 127.0.0.1 port, started and stopped by the caller (the MQTT tests
and the line-outputs benchmark talk to it; nothing is mocked).

The broker keeps its state in its own folder (``persistence``), so a stop/start keeps retained
messages and persistent subscriber sessions, like a broker restarted on a line.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """``start()``, ``stop()`` (SIGTERM: it saves its state), ``kill()``; ``url(prefix)``.

    passwords: {user: password} (anonymous clients are then refused); tls: (ca, cert, key) files
    for a TLS-only listener."""

    def __init__(self, program: str = "mosquitto", folder: Optional[Path] = None, port: Optional[int] = None,
                 passwords: Optional[Dict[str, str]] = None, tls: Optional[Tuple[str, str, str]] = None):
        self.program = shutil.which(program) or program
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="mrkd-mosquitto-"))
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.folder / "mosquitto.log"
        conf = self.folder / "mosquitto.conf"
        access = "allow_anonymous true\n"
        if passwords:
            password_file = self.folder / "passwords"
            password_file.write_text("")
            tool = shutil.which("mosquitto_passwd") or "mosquitto_passwd"
            for user, password in passwords.items():
                subprocess.run([tool, "-b", str(password_file), user, password], check=True, capture_output=True)
            access = f"allow_anonymous false\npassword_file {password_file}\n"
        if tls:
            access += f"cafile {tls[0]}\ncertfile {tls[1]}\nkeyfile {tls[2]}\n"
        conf.write_text(f"listener {self.port} 127.0.0.1\n{access}persistence true\n"
                        f"persistence_location {self.folder}/\n"
                        "user root\n"    # only read when started as root: keep our folder's owner
                        "log_type error\nlog_type warning\nlog_type notice\n")
        self.tls = bool(tls)
        self.conf = conf

    def url(self, prefix: str = "mrkd") -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}/{prefix}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.program, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
