"""A PLC simulated with pymodbus' client (not our server code): the handshake as a PLC program runs
it against the map of docs/PLC.md, for the tests and bench_plc. Addresses are written here from the
issue's table, not imported from the server, so a moved address fails."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

# coils
TRIGGER_ENABLE, TRIGGER, RESULTS_ACK, CLEAR_ERROR, SET_OFFLINE = 0, 1, 2, 3, 4
# discrete inputs
DI = dict(online=0, trigger_ready=1, trigger_ack=2, busy=3, results_valid=4, part_ok=5, part_ng=6, overrun=7,
          missed_trigger=8, error=9)
# holding registers
RECIPE, PART_ID = 0, 1
INPUT_COUNT = 19


@dataclass(frozen=True)
class Reading:
    """One read of the result registers (input registers 0..18), decoded as the map says."""

    result_code: int
    inspection_id: int
    part_id: int
    per_mille: int
    score: float
    processing_ms: int
    error_code: int
    parts_judged: int
    parts_ng: int
    missed_triggers: int
    active_recipe: int
    results_dropped: int
    results_waiting: int
    result_recipe: int

    @classmethod
    def of(cls, r: List[int]) -> "Reading":
        u32 = lambda i: (r[i] << 16) | r[i + 1]     # noqa: E731 - high word first
        score = struct.unpack(">f", struct.pack(">HH", r[4], r[5]))[0]
        return cls(r[0], r[1], r[2], r[3], score, r[6], r[7], u32(8), u32(10), u32(12), r[14], u32(15), r[17], r[18])


class ModbusError(RuntimeError):
    pass


class SimulatedPlc:
    """A PLC on one Modbus TCP connection; ``poll_s`` is its scan cycle between reads while waiting."""

    def __init__(self, port: int, host: str = "127.0.0.1", unit: int = 1, poll_s: float = 0.002,
                 timeout: float = 3.0):
        from pymodbus.client import ModbusTcpClient
        self.unit, self.poll_s = unit, poll_s
        self.client = ModbusTcpClient(host, port=port, timeout=timeout, retries=0)
        if not self.client.connect():
            raise ModbusError(f"cannot connect to {host}:{port}")
        self.polls = 0

    def _check(self, response):
        if response.isError():
            raise ModbusError(str(response))
        return response

    def bits(self) -> Dict[str, bool]:
        self.polls += 1
        response = self._check(self.client.read_discrete_inputs(0, count=len(DI), device_id=self.unit))
        return {name: bool(response.bits[address]) for name, address in DI.items()}

    def registers(self) -> Reading:
        self.polls += 1
        return Reading.of(self._check(self.client.read_input_registers(0, count=INPUT_COUNT,
                                                                       device_id=self.unit)).registers)

    def coil(self, address: int, value: bool) -> None:
        self._check(self.client.write_coil(address, value, device_id=self.unit))

    def register(self, address: int, value: int):
        return self.client.write_register(address, value, device_id=self.unit)

    def wait(self, predicate: Callable[[Dict[str, bool]], bool], timeout: float = 10.0, what: str = "") -> Dict[str, bool]:
        deadline = time.monotonic() + timeout
        while True:
            bits = self.bits()
            if predicate(bits):
                return bits
            if time.monotonic() > deadline:
                raise ModbusError(f"timed out waiting for {what or predicate}: {bits}")
            time.sleep(self.poll_s)

    def inspect(self, part_id: int, timeout: float = 10.0) -> "Cycle":
        """One part: wait for Trigger Ready, write Part Id, raise Trigger, wait for Trigger Ack, drop it,
        poll until Results Valid, read the result, acknowledge. Times are time.perf_counter()."""
        self.wait(lambda b: b["trigger_ready"], timeout, "Trigger Ready")
        self._check(self.register(PART_ID, part_id))
        triggered = time.perf_counter()
        self.coil(TRIGGER, True)
        self.wait(lambda b: b["trigger_ack"], timeout, "Trigger Ack")
        self.coil(TRIGGER, False)
        bits = self.wait(lambda b: b["results_valid"], timeout, "Results Valid")
        seen = time.perf_counter()
        reading = self.registers()
        self.coil(RESULTS_ACK, True)
        self.coil(RESULTS_ACK, False)
        return Cycle(part_id, triggered, seen, bits, reading)

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Cycle:
    part_id: int
    triggered: float
    valid_seen: float
    bits: Dict[str, bool]
    reading: Reading

    @property
    def latency_s(self) -> float:
        return self.valid_seen - self.triggered


def mbpoll_values(stdout: str) -> List[float]:
    """Values of an mbpoll poll ('[ref]: \tvalue' lines), in order."""
    values: List[float] = []
    for line in stdout.splitlines():
        if line.startswith("[") and "]:" in line:
            values.append(float(line.split("]:", 1)[1].split()[0]))   # "52428 (-13108)": unsigned first
    return values


def mbpoll(port: int, table: str, ref: int, count: int = 1, unit: int = 1, write: Optional[List[int]] = None,
           program: str = "mbpoll", timeout: float = 10.0):
    """Run Debian's mbpoll (libmodbus) once: table '0' coils, '1' discrete inputs, '3' input registers,
    '4' holding registers (or e.g. '3:float'); returns (returncode, values, stderr)."""
    import subprocess
    args = [program, "-m", "tcp", "-a", str(unit), "-0", "-t", table, "-r", str(ref), "-p", str(port), "-o", "2"]
    if ":float" in table or ":int" in table:
        args.append("-B")                      # high word first, as the map says
    if write is None:
        args += ["-c", str(count), "-1", "127.0.0.1"]
    else:
        args += ["127.0.0.1", *[str(v) for v in write]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return done.returncode, mbpoll_values(done.stdout), done.stderr.strip()
