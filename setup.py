"""Build script for the optional C++ extensions ``threempose._grouping`` and ``threempose._heatmap_nms``.

Everything else about the package lives in ``pyproject.toml``. ``pip install``
(regular or ``-e``) compiles ``csrc/grouping.cpp`` and ``csrc/heatmap_nms.cpp`` with pybind11 (listed in
``[build-system] requires``). If the compiler or pybind11 is missing, or the
compilation fails, the install still succeeds with a warning, and
``threempose.decode.grouping`` and ``threempose.decode.heatmap_nms`` fall back
to their NumPy/SciPy references (the grouping warns once at run time).
"""
from __future__ import annotations

import traceback

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that adds pybind11's headers and turns a failed build into a warning.

    The extension is also marked ``optional=True``, which tells setuptools not to
    copy a missing library into the source tree for editable installs.
    """

    def build_extension(self, ext):
        try:
            import pybind11

            ext.include_dirs.append(pybind11.get_include())
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args += ["/std:c++17", "/O2", "/fp:precise"]
            else:
                # -ffp-contract=off: no fused multiply-adds, so costs round exactly
                # like the NumPy reference (the two must agree bit for bit).
                ext.extra_compile_args += ["-std=c++17", "-O2", "-ffp-contract=off",
                                           "-fvisibility=hidden"]
            super().build_extension(ext)
        except Exception:  # noqa: BLE001 - any failure must leave a working install
            traceback.print_exc()
            self.warn(f"could not build the optional C++ extension {ext.name}; threempose will "
                      "use the slower NumPy/SciPy keypoint grouping / heatmap NMS. Install a C++17 compiler "
                      "and reinstall to build it.")


setup(
    ext_modules=[Extension("threempose._grouping", ["csrc/grouping.cpp"], language="c++", optional=True),
                 Extension("threempose._heatmap_nms", ["csrc/heatmap_nms.cpp"], language="c++", optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
