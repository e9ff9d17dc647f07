"""Hostile model files and sidecars: every mutated sidecar field gives a clear error naming the file and
the field, or a run that is correct; corrupt ONNX files, foreign and missing sidecars are refused or
announced. Sidecars are written by the exporter's own code (mrkd.export.model_metadata.write_model and,
in the slow test, the whole export_onnx); the runtime reads them through its own loader.

Oracle for an accepted mutation: the scores equal the unmutated model's on the same frames, the
threshold is finite and is the one the mutated sidecar states, decisions are score >= threshold.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime_fixtures import build_tiny_model, defective_frame, export_tiny_model, normal_frame

from mrkd.errors import MrkdError
from mrkd.runtime.detector import Detector
from mrkd.runtime.metadata import sidecar_path

HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "abc", "1.5", "nan", "0", "fp16", "resize", "uint8_nhwc_bgr", "scale0"]),
    st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=2)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=3)),
                    max_size=3),
)


def _frames():
    rng = np.random.default_rng(5)
    return [normal_frame(rng), defective_frame(rng), normal_frame(rng, 30, 90)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    model = export_tiny_model(folder / "model.onnx")
    detector = Detector(model)
    baseline = detector(_frames()).scores
    detector.close()
    return model, json.loads(sidecar_path(model).read_text()), baseline


def _field_paths(sidecar: dict):
    paths = [(key,) for key in sidecar]
    paths += [("calibration", key) for key in sidecar["calibration"]]
    return paths


def check_mutation(model, mutated: dict, path: tuple, baseline) -> str:
    """Write ``mutated`` as the sidecar of ``model`` and run; returns 'refused' or 'ran' (else fails)."""
    sidecar = sidecar_path(model)
    sidecar.write_text(json.dumps(mutated))
    try:
        detector = Detector(model)
    except MrkdError as exc:
        message = str(exc)
        assert sidecar.name in message and "\n" not in message, message
        assert path[0] in message and path[-1] in message, (path, message)
        return "refused"
    try:
        result = detector(_frames())
    finally:
        detector.close()
    np.testing.assert_allclose(result.scores, baseline, rtol=1e-6, atol=1e-7)
    stated = (mutated.get("calibration") or {}).get("threshold")
    if stated is None:      # no calibration: scores only, and the first status line says so
        assert detector.threshold is None and result.decisions is None
        assert detector.threshold_source.startswith("none") and "no calibration" in detector.describe()
        return "ran"
    assert detector.threshold == stated and math.isfinite(detector.threshold)
    assert np.array_equal(result.decisions, result.scores >= detector.threshold)
    return "ran"


def _mutate_one_field_and_check(data, model, original, baseline) -> None:
    """Delete one sidecar field or give it a hostile value (drawn by hypothesis), run check_mutation,
    and put the original sidecar back."""
    path = data.draw(st.sampled_from(_field_paths(original)), label="field")
    mutated = copy.deepcopy(original)
    holder = mutated if len(path) == 1 else mutated[path[0]]
    if data.draw(st.booleans(), label="delete"):
        del holder[path[-1]]
    else:
        holder[path[-1]] = data.draw(HOSTILE_VALUES, label="value")
    try:
        event(check_mutation(model, mutated, path, baseline))   # refused / ran: --hypothesis-show-statistics
    finally:
        sidecar_path(model).write_text(json.dumps(original))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutated_sidecar_field_is_refused_by_name_or_runs_correctly(exported, data):
    _mutate_one_field_and_check(data, *exported)


@pytest.mark.parametrize("text, field", [
    ('{"threshold": NaN}', "threshold"), ('{"threshold": "1.5"}', "threshold"), ('{"threshold": [1.5]}', "threshold"),
    ('{"threshold": "abc"}', "threshold"), ('{"threshold": 0.1, "good_mean": "abc"}', "good_mean"),
    ('{"threshold": Infinity}', "threshold"), ('{"threshold": true}', "threshold"),
    ('{"threshold": 0.1, "quantile": 1.5}', "quantile"), ('{"threshold": 0.1, "n_good": -3}', "n_good"),
    ('{"threshold": 0.1, "threshold_method": "guess"}', "threshold_method"),
])
def test_the_reported_bad_calibrations_are_refused_naming_file_and_field(exported, text, field):
    model, original, _ = exported
    sidecar = sidecar_path(model)
    body = json.dumps({**original, "calibration": "@"}).replace('"@"', text)
    try:
        sidecar.write_text(body)
        with pytest.raises(MrkdError) as info:
            Detector(model)
        assert sidecar.name in str(info.value) and field in str(info.value)
    finally:
        sidecar.write_text(json.dumps(original))


@pytest.mark.parametrize("damage", ["empty", "truncated", "noise", "json"])
def test_corrupt_onnx_is_refused_naming_the_file(exported, tmp_path, damage):
    model, original, _ = exported
    data = model.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "json": b'{"not": "onnx"}',
                        "noise": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}[damage])
    sidecar_path(broken).write_text(json.dumps(original))
    with pytest.raises(MrkdError, match="broken.onnx"):
        Detector(broken)
    sidecar_path(broken).unlink()      # and without its sidecar: still a clear error, never a traceback
    with pytest.raises(MrkdError, match="broken.onnx"):
        Detector(broken)


def test_a_sidecar_from_another_model_is_refused_naming_both(exported, tmp_path):
    model, original, _ = exported
    other = build_tiny_model(tmp_path / "other.onnx", per_scale=False, max_batch=2)   # another graph
    shutil.copy(sidecar_path(model), sidecar_path(other))
    with pytest.raises(MrkdError) as info:
        Detector(other)
    assert "other.onnx.json" in str(info.value) and "other.onnx" in str(info.value)
    assert "another model" in str(info.value) and "onnx_sha256" in str(info.value)


def test_a_missing_sidecar_is_announced_with_where_the_threshold_comes_from(exported, tmp_path, caplog):
    model, original, _ = exported
    alone = tmp_path / "alone.onnx"
    shutil.copy(model, alone)
    with caplog.at_level("WARNING"):
        detector = Detector(alone)
    detector.close()
    assert any("no sidecar alone.onnx.json" in r.getMessage() for r in caplog.records)
    assert "embedded metadata" in detector.threshold_source and "embedded metadata" in detector.describe()
    assert detector.threshold == original["calibration"]["threshold"]


def test_first_status_line_names_threshold_and_its_origin(exported):
    model, original, _ = exported
    detector = Detector(model)
    detector.close()
    assert detector.threshold_source.startswith(str(sidecar_path(model)))
    assert "quantile on 12 good parts" in detector.describe()
    override = Detector(model, threshold=0.5)
    override.close()
    assert override.threshold == 0.5 and "--threshold" in override.describe()
    with pytest.raises(MrkdError, match="finite"):
        Detector(model, threshold=float("nan"))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_sidecars_of_a_real_export(real_export, data):
    """The same property on a sidecar written by the whole export (export_onnx of a resnet18 MRKD)."""
    _mutate_one_field_and_check(data, *real_export)


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    from export_fixtures import small_model
    from mrkd.export import ExportOptions, export_onnx
    folder = tmp_path_factory.mktemp("real_export")
    model = export_onnx(small_model(), folder / "model.onnx", ExportOptions(batch_range=(1, 1, 4)),
                        simplify="never").path
    detector = Detector(model)
    baseline = detector(_frames()).scores
    detector.close()
    return model, json.loads(sidecar_path(model).read_text()), baseline


def test_the_graph_fields_a_sidecar_may_not_change_are_the_metadata_s_own(exported):
    """ModelMetadata.GRAPH_FIELDS: every one is compared with the embedded metadata; the calibration,
    hashes, precision checks and notes may differ (mrkd calibrate and the export's bf16 check rewrite them)."""
    import dataclasses
    from mrkd.runtime.metadata import MetadataError, ModelMetadata
    model, _, _ = exported
    embedded = ModelMetadata.load(sidecar_path(model))
    fields = {f.name for f in dataclasses.fields(ModelMetadata)}
    assert set(ModelMetadata.GRAPH_FIELDS) <= fields
    assert fields - set(ModelMetadata.GRAPH_FIELDS) == {"calibration", "engine", "extra", "format", "format_version",
                                                        "onnx_sha256", "precision_checks"}
    for name in ModelMetadata.GRAPH_FIELDS:
        edited = dataclasses.replace(embedded, **{name: ("edited", name)})
        with pytest.raises(MetadataError, match=f"m.json: field {name}="):
            edited.check_same_graph(embedded, "m.json")
    dataclasses.replace(embedded, calibration=None, extra={"note": 1}, onnx_sha256="0" * 64).check_same_graph(
        embedded, "m.json")


def _refusal(model, original: dict, text: str) -> str:
    """The one-line error Detector gives for ``model`` with ``text`` as its sidecar (restored after)."""
    sidecar_path(model).write_text(text)
    try:
        with pytest.raises(MrkdError) as info:
            Detector(model).close()
    finally:
        sidecar_path(model).write_text(json.dumps(original))
    return str(info.value)


@pytest.mark.parametrize("key, value", [("threshold", 1e9), ("calibraton", {"threshold": 1e9}),
                                        ("debounce", "3/5")])
def test_a_field_the_format_does_not_have_is_refused_by_name(exported, key, value):
    """A hand-edited v2 sidecar with a field the format has no place for (version 1's top-level threshold,
    a misspelt calibration, a setting that belongs to mrkd run) was read as if the field were not there:
    the alarm threshold stayed the old one and nothing said so."""
    model, original, _ = exported
    message = _refusal(model, original, json.dumps({**copy.deepcopy(original), key: value}))
    assert sidecar_path(model).name in message and f"field {key}" in message and "\n" not in message


@pytest.mark.parametrize("field, raw_value", [("image_size", "1" + "0" * 5000), ("input_format", '"' + "x" * 100000 + '"'),
                                              ("backbone", "[" + ",".join(["1"] * 50000) + "]")])
def test_an_enormous_value_is_refused_in_a_short_line(exported, field, raw_value):
    """A number of over 4300 digits ended the run in Python's int-conversion ValueError traceback; a 100 kB
    string was repeated whole in the error line."""
    model, original, _ = exported
    marker = "__enormous__"
    message = _refusal(model, original, json.dumps({**original, field: marker}).replace(f'"{marker}"', raw_value))
    assert sidecar_path(model).name in message and field in message and "\n" not in message
    assert len(message) < 400, len(message)
