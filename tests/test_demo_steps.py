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
