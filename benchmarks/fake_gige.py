"""Aravis' GigE Vision camera simulator (``arv-fake-gv-camera-0.8``, Debian ``aravis-tools``) on a
loopback address, started and stopped by the caller (the GigE tests and the parts benchmark talk to
it over the real GVCP/GVSP protocol on UDP; nothing is mocked).

GVCP's port is fixed (3956), so two simulators need two addresses: each gets its own 127.x.y.z
added to ``lo`` (``ip addr add``, root). The simulator serves 512×512 Mono8 by default and, in
trigger mode, looks for a software trigger 25 times a second (Aravis' fixed trigger_frequency):
an image comes 0-40 ms after its trigger.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional

PROGRAM = "arv-fake-gv-camera-0.8"


def loopback_addresses() -> List[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return [part.split("/")[0] for line in out.splitlines() for part in line.split() if part[:1].isdigit()
            and "/" in part]


def add_loopback_address(address: str) -> Optional[str]:
    """Give ``lo`` the address (idempotent); returns an error text or None."""
    if address == "127.0.0.1" or address in loopback_addresses():
        return None
    done = subprocess.run(["ip", "addr", "add", f"{address}/8", "dev", "lo"], capture_output=True, text=True)
    if done.returncode != 0 and address not in loopback_addresses():
        return f"ip addr add {address}/8 dev lo failed: {done.stderr.strip()} (needs root)"
    return None


class FakeGigeCamera:
    """``start()``, ``kill()`` (a camera unplugged), ``start()`` again (powered back on)."""

    def __init__(self, address: str, serial: str, lost_per_thousand: int = 0, program: str = PROGRAM,
                 debug: str = ""):
        self.address, self.serial, self.lost, self.debug = address, serial, lost_per_thousand, debug
        self.program = shutil.which(program) or program
        self.proc: Optional[subprocess.Popen] = None
        # Its messages go to a file: a pipe nobody reads fills up and then blocks the simulator's
        # writes, and with them its frames.
        self.log = tempfile.TemporaryFile()

    @property
    def uri(self) -> str:
        return f"gige://{self.address}"

    def start(self, timeout: float = 10.0) -> "FakeGigeCamera":
        if shutil.which(self.program) is None:
            raise RuntimeError(f"{self.program} not found: install Debian's aravis-tools (apt install aravis-tools)")
        error = add_loopback_address(self.address)
        if error:
            raise RuntimeError(error)
        command = [self.program, "-i", self.address, "-s", self.serial]
        if self.lost:
            command += ["-r", str(self.lost)]
        if self.debug:                  # Aravis' own log categories, e.g. "device:3,stream-thread:3"
            command += ["-d", self.debug]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{PROGRAM} on {self.address} exited with {self.proc.returncode}: "
                                   f"{self.messages()[-300:]}")
            if self._bound():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{PROGRAM} did not listen on {self.address}:3956 within {timeout} s")

    def _bound(self) -> bool:
        out = subprocess.run(["ss", "-uanp"], capture_output=True, text=True).stdout
        return any(f"{self.address}:3956" in line and f"pid={self.proc.pid}," in line for line in out.splitlines())

    def messages(self) -> str:
        """What the simulator has printed so far (its warnings), every run of it."""
        fd = self.log.fileno()     # pread: the simulator shares this file's offset, leave it alone
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Kill it for good and let go of its log."""
        self.kill()
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
