"""Build the Cython kernels in src/fastlayer/_native (C helpers live in csrc/)."""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = Path("src/fastlayer/_native")

# Extra C sources per kernel; a kernel not listed is pure Cython.
C_SOURCES = {
    "tarstream": ["csrc/walk.c", "csrc/tarhdr.c"],
    "graphload": ["csrc/graphjson.c"],
}

extensions = [
    Extension(
        f"fastlayer._native.{pyx.stem}",
        [str(pyx), *C_SOURCES.get(pyx.stem, [])],
        include_dirs=["csrc", numpy.get_include()],
        depends=[str(h) for h in sorted(Path("csrc").glob("*.h"))],  # rebuild on header edits
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=c11", "-D_GNU_SOURCE"],
    )
    for pyx in sorted(NATIVE.glob("*.pyx"))
    # FASTLAYER_ONLY=a,b builds just those kernels (for quick local rebuilds).
    if not os.environ.get("FASTLAYER_ONLY") or pyx.stem in os.environ["FASTLAYER_ONLY"].split(",")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
