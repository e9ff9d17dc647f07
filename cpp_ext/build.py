"""Extension build for cpp_ext (imported by setup.py). Filled in by the cpp_ext work."""

from setuptools.command.build_ext import build_ext as BuildExtension  # noqa: F401


def extensions():
    return []
