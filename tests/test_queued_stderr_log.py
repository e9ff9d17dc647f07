"""mrkd run's logging never blocks the thread that logs (runtime/queued_stderr_log.py): a stderr pipe
nobody reads used to block every thread that logged, the PLC's event loop included."""

from __future__ import annotations

import logging
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from plc_fixtures import connect_plc, modbus_line_run, part_images
from runtime_fixtures import build_tiny_model

from mrkd.runtime.queued_stderr_log import DROPPED, QueuedStderrLog

DROPPED_LINE = re.compile(r"^WARNING mrkd\.runtime\.queued_stderr_log: (\d+) log records dropped: "
                          r"stderr was not being read$")
REFUSED_LINE = re.compile(r"^WARNING mrkd\.runtime\.plc\.handshake: modbus\S*: trigger refused: Trigger Enable is 0 "
                          r"\((\d+) missed\)(?: \(and (\d+) more like this since the last one said\))?$")


class StalledStream:
    """A stream whose writes wait until ``release()`` (forever if never): a stderr pipe nobody reads."""

    def __init__(self):
        self.lines, self.released = [], threading.Event()

    def write(self, text):
        self.released.wait()
        self.lines.extend(text.splitlines())
        return len(text)

    def flush(self):
        pass

    def release(self):
        self.released.set()


def attached(log: QueuedStderrLog, name: str) -> logging.Logger:
    """A logger of the test's own that sends its records to ``log`` (the root keeps pytest's handlers)."""
    target = logging.getLogger(name)
    target.handlers[:] = [log.handler]
    target.propagate, target.level = False, logging.WARNING
    return target


def test_a_stalled_stream_drops_and_counts_records_without_blocking_the_logger():
    stream = StalledStream()
    log = QueuedStderrLog.start(stream, capacity=50)
    target = attached(log, "mrkd.test.stalled")
    slowest = 0.0
    for number in range(1000):
        started = time.perf_counter()
        target.warning("record %d", number)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.5, slowest                 # a blocking handler would never return here
    stream.release()
    assert log.close(deadline_s=10)
    written = [int(line.rsplit(" ", 1)[1]) for line in stream.lines if line.startswith("WARNING mrkd.test.stalled:")]
    dropped = [int(DROPPED_LINE.match(line).group(1)) for line in stream.lines if DROPPED_LINE.match(line)]
    # the writer held one record (blocked in its write) and the queue 50; the rest was counted
    assert written == sorted(set(written)) and len(written) in (50, 51), written
    assert dropped == [1000 - len(written)] and DROPPED_LINE.match(stream.lines[-1]), stream.lines[-3:]
    assert DROPPED.format(7) == "7 log records dropped: stderr was not being read"


def test_the_exit_waits_no_longer_than_its_deadline_for_a_stream_that_never_takes_anything():
    stream = StalledStream()               # never released
    log = QueuedStderrLog.start(stream, capacity=10)
    target = attached(log, "mrkd.test.never")
    for number in range(100):
        target.warning("record %d", number)
    started = time.monotonic()
    assert log.close(deadline_s=0.5) is False
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    assert log.close(deadline_s=5) is False and time.monotonic() - started < 0.1    # said once, not waited again
    target.warning("after the close")       # still neither blocks nor raises
    stream.release()


def test_a_healthy_stream_gets_every_record_in_order_and_no_drop_line(tmp_path):
    path = tmp_path / "stderr.txt"
    with open(path, "w", encoding="utf-8") as stream:
        log = QueuedStderrLog.start(stream)
        target = attached(log, "mrkd.test.healthy")
        for number in range(5000):
            target.warning("record %d", number)
            if number == 2499:
                log.say("a status line, 100% as it is")
        target.info("below the level: not written")
        assert log.close(deadline_s=10)
    lines = path.read_text(encoding="utf-8").splitlines()
    expected = [f"WARNING mrkd.test.healthy: record {n}" for n in range(5000)]
    assert lines == expected[:2500] + ["a status line, 100% as it is"] + expected[2500:]


def test_a_record_that_cannot_be_formatted_prints_no_traceback_on_the_logging_thread(capsys):
    stream = StalledStream()
    stream.release()
    log = QueuedStderrLog.start(stream)
    target = attached(log, "mrkd.test.broken")
    target.warning("a number: %d", "not a number")
    assert log.close(deadline_s=10)
    assert capsys.readouterr().err == ""          # the stdlib printed '--- Logging error ---' and a traceback here
    assert len(stream.lines) == 1 and stream.lines[0].startswith("ERROR mrkd.test.broken: a log record could not "
                                                                 "be formatted (TypeError("), stream.lines


def run_script(body: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_a_process_writes_every_record_by_its_exit_in_the_format_of_mrkd_run():
    """The atexit path (no close by the command) and the decorator's: all there, in order, same format."""
    done = run_script("""
        import logging, sys, threading
        from mrkd.runtime.queued_stderr_log import log_to_stderr_through_queue, logging_through_queue

        @logging_through_queue
        def command():
            log = logging.getLogger("mrkd.demo.first")
            for n in range(3000):
                log.warning("first %d", n)
            logging.getLogger("mrkd.demo.first").info("not at warning level")
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("failed")
            assert log_to_stderr_through_queue() is None      # installed once at a time
        command()
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines[:3000] == [f"WARNING mrkd.demo.first: first {n}" for n in range(3000)]
    assert lines[3000] == "ERROR mrkd.demo.first: failed" and lines[3001] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero" and "dropped" not in done.stderr

    done = run_script("""
        import logging
        from mrkd.runtime.queued_stderr_log import log_to_stderr_through_queue
        log_to_stderr_through_queue()
        for n in range(3000):
            logging.getLogger("mrkd.demo.second").warning("second %d", n)
    """)
    assert done.returncode == 0 and done.stderr.splitlines() == [f"WARNING mrkd.demo.second: second {n}"
                                                                 for n in range(3000)]


def test_a_second_command_in_the_same_process_writes_its_records_in_the_same_format():
    """A caller of the CLI's main runs mrkd run twice in one process: the second run's records went to
    Python's last resort (no handler left on the root), without the level and logger name."""
    done = run_script("""
        import logging
        from mrkd.runtime.queued_stderr_log import logging_through_queue

        @logging_through_queue
        def command(number):
            logging.getLogger("mrkd.demo.again").warning("run %d", number)
        command(1)
        logging.getLogger("mrkd.demo.again").warning("between")   # a thread the first run left, say
        command(2)
        logging.getLogger("mrkd.demo.again").warning("after")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    # records after a run's close kept no format either (Python's last resort: the message alone)
    assert done.stderr.splitlines() == ["WARNING mrkd.demo.again: run 1", "WARNING mrkd.demo.again: between",
                                        "WARNING mrkd.demo.again: run 2", "WARNING mrkd.demo.again: after"]


def test_a_process_whose_stderr_is_never_read_still_exits():
    """The exit waits for the writer only until the deadline: a stalled stderr does not hang it."""
    script = textwrap.dedent("""
        import logging, sys
        from mrkd.runtime.queued_stderr_log import logging_through_queue, EXIT_DEADLINE_S

        @logging_through_queue
        def command():
            for n in range(20000):       # 20000 lines of 70 bytes: far more than a pipe holds
                logging.getLogger("mrkd.demo.stalled").warning("a record nobody reads %d", n)
        command()
        print("returned", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        started = time.monotonic()
        assert process.wait(timeout=30) == 0      # stderr is not read until the process has ended
        assert time.monotonic() - started < 25
        out, err = process.stdout.read(), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    written = [line for line in err.splitlines() if line.startswith("WARNING mrkd.demo.stalled: a record")]
    assert out == "returned\n" and 100 < len(written) < 20000 and "Traceback" not in err


def test_a_stop_signal_that_lands_while_the_main_thread_logs_does_not_hang_it():
    """mrkd run's Ctrl-C / SIGTERM handler (stop_on_signals) logs a warning on the main thread, between
    any two steps of what that thread was doing. Landing inside the main thread's own hand-over of a
    record, it must not wait for a lock that thread holds: with queue.Queue's lock it waited forever,
    and every later SIGTERM likewise (the run never stopped; seen in about one of 5-40 single signals)."""
    script = textwrap.dedent("""
        import logging, os, signal, threading, time
        from mrkd.runtime.line.stream import stop_on_signals
        from mrkd.runtime.queued_stderr_log import logging_through_queue

        @logging_through_queue
        def command():
            with stop_on_signals(threading.Event(), signals=(signal.SIGUSR1,)):
                def send():        # a signal every millisecond while the main thread logs
                    for _ in range(1000):
                        os.kill(os.getpid(), signal.SIGUSR1)
                        time.sleep(0.001)
                sender = threading.Thread(target=send)
                sender.start()
                number = 0
                while sender.is_alive():
                    logging.getLogger("mrkd.demo.busy").warning("frame %d", number)
                    number += 1
                sender.join()
        command()
        print("returned", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the process hung: a signal handler's log record waited for the main thread's own lock")
    assert process.returncode == 0 and out == "returned\n", err[-2000:]
    handled = [line for line in err.splitlines() if line.startswith("WARNING mrkd.runtime.line.stream: SIGUSR1:")]
    assert handled and "Traceback" not in err


# ------------------------------------------------------------------ mrkd run serving a Modbus PLC

EDGES = 3000        # refused trigger edges, each answered while stderr takes nothing
BATCH = 200         # Modbus frames per send: pipelined, as a PLC gateway may


def write_coil_frame(transaction: int, coil: int, on: bool) -> bytes:
    """Modbus TCP function 5 (write single coil), written from the spec, not from our server."""
    return struct.pack(">HHHBBHH", transaction & 0xFFFF, 0, 6, 1, 5, coil, 0xFF00 if on else 0x0000)


def refused_edges(port: int, edges: int, answer_within_s: float) -> None:
    """``edges`` rising edges of Trigger (coil 1) while Trigger Enable is 0: each one refused, counted
    and said (the first few, then one line standing for many). Every batch must be answered within
    ``answer_within_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=answer_within_s) as connection:
        frames = [write_coil_frame(n, 1, n % 2 == 0) for n in range(2 * edges)]
        for start in range(0, len(frames), BATCH):
            connection.sendall(b"".join(frames[start:start + BATCH]))
            expected, answered = 12 * len(frames[start:start + BATCH]), b""
            try:
                while len(answered) < expected:
                    chunk = connection.recv(65536)
                    assert chunk, "mrkd run closed the connection"
                    answered += chunk
            except socket.timeout:
                pytest.fail(f"the PLC server stopped answering after {start // 2} refused edges")
            assert answered == b"".join(frames[start:start + BATCH])      # function 5 echoes the request


def test_mrkd_run_answers_its_plc_while_nobody_reads_its_stderr(tmp_path):
    """stderr is a pipe already full, not read until the PLC has been served: the run's start-up lines
    and the refused edges' warnings wait in the queue, while the PLC's requests are answered. Before the
    queue the first of them blocked the thread that wrote it, the PLC server's event loop included (it
    stopped answering). The refused edges once wrote a line each and filled the queue too (the drop
    count is tested above, on a stream of the test's own); now the few lines say every edge."""
    import os
    pytest.importorskip("pymodbus", reason="SKIPPED, NOT TESTED: pymodbus missing (pip install 'mrkd[plc]')")
    read_end, write_end = full_pipe()
    process, port = modbus_line_run(tmp_path, "g", stderr=write_end)
    os.close(write_end)
    err, reader = [], None
    try:
        plc = connect_plc(port, process, timeout=60, client_timeout=1.0)
        refused_edges(port, EDGES, answer_within_s=5.0)
        for _ in range(10):                              # the status registers, within the client's 1 s
            started = time.monotonic()
            reading = plc.registers()
            assert time.monotonic() - started < 1.0
        assert reading.missed_triggers == EDGES
        plc.close()
        reader = threading.Thread(target=lambda: err.append(drain(read_end)), daemon=True)
        reader.start()                                   # stderr is read from now on: the writer catches up
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if reader is None or not reader.is_alive():
            os.close(read_end)
    lines = err[0].decode().lstrip(".").splitlines()
    assert any(line.startswith("Modbus TCP PLC server on 127.0.0.1:") for line in lines), lines[:5]
    said = [m for m in map(REFUSED_LINE.match, lines) if m]
    # the first said as they came, the rest counted in one line at the stop
    assert [int(m.group(1)) for m in said[:3]] == [1, 2, 3] and len(said) <= 5, lines
    assert sum(1 + int(m.group(2) or 0) for m in said) == EDGES, lines
    assert not any(DROPPED_LINE.match(line) for line in lines) and "Traceback" not in "\n".join(lines)


def test_mrkd_run_status_lines_do_not_stop_the_frame_loop_while_nobody_reads_its_stderr(tmp_path):
    """The frame loop writes a status line per --status-every: on a stderr nobody reads it blocked there
    and scored nothing more (the part runner's status lines the same). They go through the queue too."""
    import json
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "gd")
    process = subprocess.Popen([sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"),
                                "--loop", "--max-frames", "1500", "--status-every", "0.001"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.wait(timeout=60) == 0        # stderr is not read until the process has ended
        out, err = process.stdout.read(), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert json.loads(out[out.index("{"):])["frames"] == 1500
    status = [line for line in err.splitlines() if " frames, ms p50/p99 per frame: " in line]
    assert 10 < len(status) < 1500 and "Traceback" not in err, err[-2000:]


# ------------------------------------------------------------------ mrkd run's own lines (main thread)

def full_pipe():
    """(read end, write end) of a pipe already full: a stderr whose reader has stopped. The write end is
    blocking again (its flags are the child's too), so the first direct write to it waits."""
    import fcntl
    import os
    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(write_end, b"." * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
    return read_end, write_end


def drain(read_end: int) -> bytes:
    import os
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def mrkd_run_with_lines_of_its_own(tmp_path, stderr_fd: int) -> subprocess.Popen:
    """`mrkd run` of the tiny model whose main thread writes start-up lines (the model, the threshold
    given, a warning on it) and an exit line (an MQTT output that delivered nothing: no broker)."""
    from mrkd.benchmarks.mosquitto import free_port
    model = build_tiny_model(tmp_path / "tiny.onnx")
    part_images(tmp_path / "parts", "gd")
    return subprocess.Popen([sys.executable, "-m", "mrkd.cli", "run", str(model), "--source", str(tmp_path / "parts"),
                             "--loop", "--max-frames", "50", "--threshold", "1e9", "--status-every", "0",
                             "--mqtt", f"mqtt://127.0.0.1:{free_port()}/line"],
                            stdout=subprocess.PIPE, stderr=stderr_fd, text=True)


def test_mrkd_run_writes_its_own_lines_in_order_with_the_records_without_waiting_for_stderr(tmp_path):
    """Its start-up and exit lines went to stderr directly (click.echo) beside the queue: on a full pipe
    the main thread blocked at its first line, and they could overtake records logged before them. Now
    the run ends (its summary on stdout) while stderr is still full, and every line comes out in order."""
    import json
    import os
    read_end, write_end = full_pipe()
    process = mrkd_run_with_lines_of_its_own(tmp_path, write_end)
    os.close(write_end)
    try:
        summary, ended = [], threading.Event()

        def read_summary():
            for line in process.stdout:        # the summary's JSON ends with a "}" of its own
                summary.append(line)
                if line == "}\n":
                    break
            ended.set()
        threading.Thread(target=read_summary, daemon=True).start()
        assert ended.wait(60) and summary, "mrkd run did not get to its summary while stderr was full"
        err = drain(read_end).decode().lstrip(".")      # from here stderr is read: the writer catches up
        assert process.wait(timeout=30) == 0
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.kill()
    assert json.loads("".join(summary))["frames"] == 50
    lines = err.splitlines()
    assert lines[0].startswith("tiny.onnx: ") and " threshold 0.1 " in lines[0], lines
    assert lines[1] == "camera cam0: threshold 1000000000.0 given (--threshold or the line file); the model's is not used"
    assert lines[2].startswith("warning: camera cam0: threshold 1e+09 is 1e+10x the model's calibrated 0.1")
    unreachable = [n for n, line in enumerate(lines) if line.startswith("WARNING mrkd.runtime.outputs: output mqtt")]
    assert unreachable and unreachable[0] > 2, lines           # a record of the output's thread, after them
    assert lines[-1].startswith("warning: outputs that did not deliver everything: mqtt ("), lines   # exit: last
    assert "Traceback" not in err


def test_mrkd_run_whose_stderr_is_never_read_exits_within_its_deadline(tmp_path):
    """The pipe is full from the start and never read: the run judges its frames, writes its summary and
    exits once the queue's exit deadline (EXIT_DEADLINE_S) has passed, where it blocked on its first line."""
    import os
    from mrkd.runtime.queued_stderr_log import EXIT_DEADLINE_S
    read_end, write_end = full_pipe()
    process = mrkd_run_with_lines_of_its_own(tmp_path, write_end)
    os.close(write_end)
    try:
        started = time.monotonic()
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("mrkd run hung on a stderr nobody reads")
        assert time.monotonic() - started < 30 + EXIT_DEADLINE_S
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0 and '"frames": 50' in out
