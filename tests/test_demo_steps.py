"""mrkd demo's steps: listed by name in mrkd/demo.py, the export/runtime ones in mrkd/demo_steps/
(not inside the library packages, and not registered by import side effects)."""

import importlib
import importlib.util


def test_demo_steps_resolve_in_order():
    from mrkd import demo
    names = [name for name, _ in demo.DEMO_STEPS] + [name for name, _ in demo.DEMO_LAYER_STEPS]
    assert names == ["generate", "train", "eval", "export", "run", "cell"]
    for _, target in demo.DEMO_LAYER_STEPS:
        module, function = target.split(":")
        assert module.startswith("mrkd.demo_steps.")
        assert callable(getattr(importlib.import_module(module), function))
    assert [name for name, _ in demo.DEMO_STEPS] == ["generate", "train", "eval"]  # importing added none


def test_library_packages_hold_no_demo_code():
    for name in ("mrkd.export.demo_step", "mrkd.runtime.demo_step"):
        assert importlib.util.find_spec(name) is None, name


def test_the_demos_parts_and_clip_take_no_hidden_folder_as_a_defect_type(tmp_path):
    # The demo reads its test split as evaluation does: a .thumbs/ folder there is no defect type.
    import cv2
    import numpy as np
    from mrkd.demo_steps.cell import part_folder
    from mrkd.demo_steps.stream import FRAMES_PER_IMAGE, test_split_video
    for name in ("good/0.png", "crack/0.png", ".thumbs/0.png"):
        (tmp_path / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "test" / name), np.zeros((16, 16, 3), np.uint8))
    parts = part_folder(tmp_path, tmp_path / "parts")
    assert sorted(part.kind for part in parts) == ["crack", "good"]
    frames = test_split_video(tmp_path, tmp_path / "clip.avi")
    assert len(frames["defective"]) == FRAMES_PER_IMAGE
