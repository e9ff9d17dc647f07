"""The evidence folder's budget and its failures, as a line's IT sees them: an OK sample that cannot fit
in the budget beside the alarm evidence already kept is never written and then deleted by its own
budget check (the part record used to name a file that was gone, counted as sent); a folder in the
way that is a file is named as such, not as "evidence exists"."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mrkd.runtime.outputs.base import CameraJudgement, FrameResult, PartResult, Verdict
from mrkd.runtime.outputs.evidence import EvidenceSettings, EvidenceWriter


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)   # PNG ~4.8 kB


def _alarm(image: np.ndarray, event_id: str) -> FrameResult:
    return FrameResult("cam0", 0, 0.0, image, np.zeros((8, 8), np.float32), 1.0, 0.5, True,
                       event={"event_id": event_id})


def _view(image: np.ndarray) -> FrameResult:
    """An OK part's judged image, as the part runner hands it to part_fields."""
    return FrameResult("cam0", 0, 0.0, image, np.zeros((8, 8), np.float32), 0.0, 1.0, False)


def _ok_part(inspection_id: int) -> PartResult:
    return PartResult(inspection_id=inspection_id, part_id=str(inspection_id), verdict=Verdict.OK, score=0.0,
                      threshold=1.0, cameras=(CameraJudgement("cam0", 0.0, 1.0, False, images=1),), model_sha256="m")


def test_an_ok_sample_that_cannot_fit_beside_the_evidence_is_dropped_not_named_and_deleted(tmp_path):
    image = _noise(0)
    size = len(cv2.imencode(".png", image)[1])
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(size * 1.5)))
    assert writer.event_fields(_alarm(image, "e1"))["evidence"] is not None     # fits: half a sample left
    fields = writer.part_fields(_ok_part(1), {"cam0": _view(image)})
    named = fields.get("cam0", {}).get("evidence")
    assert named is None or Path(named).is_file(), f"the part names {named}, which is gone"
    assert writer.ok_deleted == 0 and writer.ok_written == 0
    health = writer.health()
    assert health.dropped == 1 and health.sent == 1 and health.failed == 0, health
    assert (tmp_path / "cam0" / "e1.png").is_file()
    assert not list(tmp_path.rglob("part*.png"))          # nothing written for the dropped sample


def test_a_camera_folder_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "cam0").write_text("not a folder")
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path)))
    assert writer.event_fields(_alarm(_noise(1), "e1"))["evidence"] is None
    health = writer.health()
    assert health.failed == 1 and not health.ok
    assert "never overwritten" not in health.detail and "not a folder" in health.detail, health.detail
    assert str(tmp_path / "cam0") in health.detail


def test_two_runs_on_one_folder_racing_for_an_ok_samples_name_both_keep_theirs(tmp_path, monkeypatch):
    """Two cells pointed at one evidence folder, both camera cam0, started together: the other run
    creates ok/<frame>.png between this run's look and its write (seen as 4 of 100 samples lost, each
    'failing: exists; evidence is never overwritten', in two real `mrkd run`s at 40 fps). The other
    run's file is kept and this run's sample goes under its own name."""
    from mrkd.runtime.outputs import evidence as evidence_module
    real_write = evidence_module.write_new_file
    theirs = b"the other run's sample"

    def other_run_first(path, data):
        if Path(path).name == "part0000000007.png" and not Path(path).exists():
            Path(path).write_bytes(theirs)        # the other process wins the race for this name
        return real_write(path, data)
    monkeypatch.setattr(evidence_module, "write_new_file", other_run_first)
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1))
    image = _noise(2)
    fields = writer.part_fields(_ok_part(7), {"cam0": _view(image)})
    health = writer.health()
    assert health.failed == 0 and health.sent == 1 and writer.ok_written == 1, health
    ours = Path(fields["cam0"]["evidence"])
    assert ours.name != "part0000000007.png" and ours.read_bytes() == cv2.imencode(".png", image)[1].tobytes()
    assert (tmp_path / "cam0" / "ok" / "part0000000007.png").read_bytes() == theirs


def test_evidence_an_archive_job_moved_away_no_longer_counts_against_the_budget(tmp_path):
    """The folder over its budget with alarm evidence only ('over budget', OK samples skipped, /healthz
    503), then a nightly job moves the evidence to the archive server, as the warning asks ("free
    space"): the running writer used to count the moved files for the rest of the run (a real run:
    15.9 MB counted in a folder holding 12 kB, every OK sample dropped until a restart). It looks at
    the folder again (at most every recount_every_s) and delivers again."""
    image = _noise(3)
    size = len(cv2.imencode(".png", image)[1])
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path / "evidence"), ok_every=1, max_bytes=int(size * 3.5)))
    writer.recount_every_s = 0.0          # the next look is due at once (10 s on a line)
    for k in range(4):
        assert writer.event_fields(_alarm(image, f"e{k}"))["evidence"] is not None
    assert writer.health().state == "over budget" and not writer.health().ok
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in (tmp_path / "evidence" / "cam0").glob("*.png"):
        path.rename(archive / path.name)
    fields = writer.part_fields(_ok_part(1), {"cam0": _view(image)})
    assert Path(fields["cam0"]["evidence"]).is_file()
    health = writer.health()
    assert health.ok and health.state == "delivering" and health.dropped == 0, health
    assert writer.used_bytes == size


def test_the_counted_bytes_follow_the_folder_through_writes_deletions_and_a_restart(tmp_path):
    """The budget's count of OK sample bytes is now kept as samples come and go (a sum over every sample
    after each write cost O(samples) per write). It must equal what is on disk, counted here by walking
    the folder, after OK samples were written and the oldest deleted for the budget, alarm evidence
    added, and a new writer counting what the first left."""
    def on_disk(folder: Path) -> int:
        return sum(path.stat().st_size for path in folder.rglob("*.png"))
    images = [_noise(10 + k) for k in range(30)]
    size = max(len(cv2.imencode(".png", image)[1]) for image in images)
    writer = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(size * 8.5)))
    for k, image in enumerate(images):
        writer.part_fields(_ok_part(k + 1), {"cam0": _view(image)})
        if k % 7 == 6:
            assert writer.event_fields(_alarm(image, f"e{k}"))["evidence"] is not None
        assert writer.used_bytes == on_disk(tmp_path), k
    assert writer.ok_deleted > 0 and writer.used_bytes <= int(size * 8.5)
    again = EvidenceWriter(EvidenceSettings(str(tmp_path), ok_every=1, max_bytes=int(size * 8.5)))
    assert again.used_bytes == on_disk(tmp_path)
    kept = len(list((tmp_path / "cam0" / "ok").glob("*.png")))
    assert len(again._ok_files) == kept and sum(size for _, size in again._ok_files) == again._ok_files.bytes
