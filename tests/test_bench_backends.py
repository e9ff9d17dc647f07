"""`mrkd bench --only backends`: one backend's threads must not tax the row timed after it."""

import numpy as np
import pytest

from mrkd.benchmarks import bench_backends
from mrkd.runtime.backends.onnxruntime_backend import STOP_SPINNING_AFTER_RUN


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return bench_backends._graphs("efficientnet_lite0", 64, tmp_path_factory.mktemp("backends"), quick=True)


def test_no_backend_leaves_threads_burning_cpu_after_a_call(graphs):
    # ONNX Runtime's intra-op threads used to spin on for tens of ms after each run (most of a 20 ms
    # window here), on the core the next alternated row needed: the row after it took up to 1.8x its
    # own time, so a row's number depended on the order of the backends. Measured as CPU time the
    # process burns while the calling thread sleeps, not as a latency, so other load cannot fake it.
    # The bench opens its sessions as the runtime does (no setting of its own).
    detectors, errors = bench_backends.open_detectors(graphs, threads=2)
    try:
        onnxruntime_rows = [label for label in detectors if "onnxruntime" in label]
        assert len(onnxruntime_rows) == 2, (list(detectors), errors)
        frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for detector in detectors.values():
            detector(frame)
        window_ms = bench_backends.IDLE_WINDOW_S * 1e3
        busy = {label: bench_backends.busy_after_call_ms(detector, frame, probes=7)
                for label, detector in detectors.items()}
        assert all(ms < 0.25 * window_ms for ms in busy.values()), busy
        for label in onnxruntime_rows:
            options = detectors[label].backend.session.get_session_options()
            assert options.get_session_config_entry(STOP_SPINNING_AFTER_RUN[0]) == STOP_SPINNING_AFTER_RUN[1]
    finally:
        for detector in detectors.values():
            detector.close()
