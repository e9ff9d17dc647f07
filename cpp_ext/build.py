"""Build of the post-processing extension (imported by setup.py).

``extensions()`` lists the setuptools Extensions: ``mrkd.runtime._postprocess_cpu`` (C++ with its
own thread pool, always) and ``mrkd.runtime._postprocess_cuda`` (only when nvcc is found via
CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda, and MRKD_NO_CUDA is not set). ``BuildExtension`` compiles the .cu
sources with nvcc and links them with the host compiler; cudart is linked statically so the module
imports on machines without a GPU.

Environment:
  MRKD_NO_CUDA=1          skip the CUDA extension.
  MRKD_CUDA_ARCHS="87;90" GPU architectures (cubins for each, PTX for the highest); default
                          75, 80 and 87 (Jetson Orin) where this nvcc supports them.
  MRKD_REQUIRE_CUDA=1     fail the install when the CUDA extension cannot be built (default: warn
                          and install the CPU extension only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_NAME = "mrkd.runtime._postprocess_cpu"
CUDA_NAME = "mrkd.runtime._postprocess_cuda"
# Turing and Ampere cubins cover most x86 GPUs (8.0 runs on 8.6/8.9), 8.7 is Jetson Orin; the PTX
# of the highest one is JIT-compiled by any newer GPU.
DEFAULT_ARCHS = ("75", "80", "87")


def _note(message: str) -> None:
    print(f"[mrkd cpp_ext] {message}", file=sys.stderr)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to setup.py
    return os.path.relpath(os.path.join(HERE, *parts), os.path.dirname(HERE))


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.isfile(fallback) else None


def cuda_root(nvcc: str) -> str:
    """CUDA toolkit root; nvcc on PATH may be a wrapper script, so ask nvcc where it lives."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        if match:
            return os.path.dirname(os.path.normpath(match.group(1)))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def supported_archs(nvcc: str) -> list[str]:
    """Compute capabilities this nvcc can target, e.g. ['75', '80', ...] (empty if it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"compute_(\d+)", out)


def cuda_archs(nvcc: str) -> list[str]:
    """Architectures to build: MRKD_CUDA_ARCHS or the defaults, less those nvcc cannot target."""
    requested = os.environ.get("MRKD_CUDA_ARCHS", "")
    wanted = [a.replace(".", "").strip() for a in re.split(r"[;, ]+", requested) if a.strip()] or list(DEFAULT_ARCHS)
    supported = supported_archs(nvcc)
    if not supported:
        return wanted
    dropped = [a for a in wanted if a not in supported]
    if dropped:
        _note(f"nvcc cannot target sm_{', sm_'.join(dropped)}; skipping them")
    kept = [a for a in wanted if a in supported]
    if not kept:
        kept = [supported[0]]
        _note(f"none of the requested architectures is supported; building sm_{kept[0]}")
    return kept


def gencode_flags(archs: list[str]) -> list[str]:
    """Cubins for every arch, PTX for the highest (forward compatibility)."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    top = max(archs, key=int)
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]


def extensions() -> list[Extension]:
    """The Extensions to build: the CPU one always, the CUDA one when nvcc is usable."""
    import pybind11

    common_cflags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    exts = [
        Extension(
            CPU_NAME,
            sources=[_rel("postprocess_cpu.cpp")],
            include_dirs=[pybind11.get_include(), HERE],
            extra_compile_args=common_cflags + ["-pthread"],
            extra_link_args=["-pthread"],
            depends=[_rel("postprocess_common.h")],
            language="c++",
        )
    ]
    if _env_flag("MRKD_NO_CUDA"):
        _note("MRKD_NO_CUDA is set: building the CPU post-processing only")
        return exts
    nvcc = find_nvcc()
    if nvcc is None:
        _note("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): building the CPU "
              "post-processing only")
        return exts
    root = cuda_root(nvcc)
    target = os.path.join(root, "targets", f"{os.uname().machine.replace('arm64', 'aarch64')}-linux")
    include_dirs = [d for d in (os.path.join(root, "include"), os.path.join(target, "include")) if os.path.isdir(d)]
    lib_dirs = [d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib"), os.path.join(target, "lib"))
                if os.path.isdir(d)]
    cuda = Extension(
        CUDA_NAME,
        sources=[_rel("postprocess_cuda_bind.cpp"), _rel("postprocess_cuda.cu")],
        include_dirs=[pybind11.get_include(), HERE] + include_dirs,
        library_dirs=lib_dirs,
        libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=common_cflags,
        depends=[_rel("postprocess_common.h"), _rel("postprocess_cuda.h")],
        language="c++",
    )
    cuda.nvcc = nvcc  # read by BuildExtension
    exts.append(cuda)
    return exts


class BuildExtension(build_ext):
    """build_ext that compiles .cu sources with nvcc and treats a failed CUDA build as optional
    unless MRKD_REQUIRE_CUDA=1."""

    def build_extensions(self):
        self._failed_optional = []
        super().build_extensions()
        # later steps (copy into the source tree for editable installs) must not look for them
        self.extensions = [e for e in self.extensions if e not in self._failed_optional]

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            return super().build_extension(ext)
        try:
            objects = [self._nvcc_compile(ext, src) for src in cu_sources]
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects) + objects
            super().build_extension(ext)
        except Exception as exc:  # nvcc present but unusable: keep the CPU install working
            if _env_flag("MRKD_REQUIRE_CUDA"):
                raise
            self._failed_optional.append(ext)
            _note(f"WARNING: building {ext.name} failed ({exc}); installing without CUDA "
                  "post-processing (set MRKD_REQUIRE_CUDA=1 to make this an error)")

    def _nvcc_compile(self, ext, source: str) -> str:
        nvcc = getattr(ext, "nvcc", None) or find_nvcc()
        archs = cuda_archs(nvcc)
        obj_dir = os.path.join(self.build_temp, os.path.dirname(source))
        os.makedirs(obj_dir, exist_ok=True)
        obj = os.path.join(obj_dir, os.path.splitext(os.path.basename(source))[0] + ".o")
        if not self.force and os.path.exists(obj) and all(
                os.path.getmtime(obj) >= os.path.getmtime(dep) for dep in [source] + list(ext.depends)):
            return obj
        host_cxx = (sysconfig.get_config_var("CXX") or "g++").split()[0]
        cmd = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
               "-Xcompiler", "-fvisibility=hidden", f"-ccbin={shutil.which(host_cxx) or host_cxx}"]
        cmd += [f"-I{d}" for d in ext.include_dirs] + gencode_flags(archs)
        _note(f"nvcc for sm_{', sm_'.join(archs)} (+PTX): {source}")
        self.spawn(cmd)
        return obj
