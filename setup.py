"""Build fastbn's Cython extensions, with OpenMP where the compiler has it.

Environment switches:
  FASTBN_REQUIRE_OPENMP=1   fail the build instead of falling back to serial kernels
  FASTBN_DISABLE_OPENMP=1   build serial kernels even where OpenMP works (tests the fallback)
  FASTBN_MARCH_NATIVE=1     add -march=native (not portable: only for a build you run where you built it)
  FASTBN_BOUNDSCHECK=1      turn Cython bounds and wraparound checks back on (debugging)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


def _openmp_flags(compiler_type):
    """(compile flags, link flags) that turn OpenMP on for this compiler."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang needs libomp from Homebrew
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _openmp_works(compiler, cflags, ldflags):
    """Compile, link and *run* a tiny OpenMP program with these flags."""
    tmp = tempfile.mkdtemp(prefix="fastbn-omp-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("probe.c", "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile(["probe.c"], extra_postargs=cflags)
        compiler.link_executable(objs, "probe", extra_postargs=ldflags)
        out = subprocess.run([os.path.join(tmp, "probe")], capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and out.stdout.strip() == "1"
    except Exception:  # any failure means "no usable OpenMP"
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Pick per-compiler flags and decide on OpenMP at build time."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            cflags, ldflags = ["/O2"], []
        else:
            # -fopenmp-simd honours `#pragma omp simd` (vectorized reductions) even without
            # OpenMP threads; no -ffast-math: NaN/Inf must propagate like PyTorch's.
            cflags, ldflags = ["-O3", "-fopenmp-simd", "-fno-math-errno"], []
            if os.environ.get("FASTBN_MARCH_NATIVE") == "1":
                cflags.append("-march=native")
        omp_c, omp_l = _openmp_flags(ctype)
        openmp = os.environ.get("FASTBN_DISABLE_OPENMP") != "1" and _openmp_works(self.compiler, omp_c, omp_l)
        if openmp:
            cflags += omp_c
            ldflags += omp_l
        else:
            msg = (
                "fastbn: the C compiler has no working OpenMP; building SERIAL kernels "
                "(one thread). On macOS: `brew install libomp`. "
                "Set FASTBN_REQUIRE_OPENMP=1 to make this an error."
            )
            if os.environ.get("FASTBN_REQUIRE_OPENMP") == "1":
                raise RuntimeError(msg)
            warnings.warn(msg)
            print("\n" + "!" * 78 + "\n" + msg + "\n" + "!" * 78 + "\n", file=sys.stderr)
        flags_text = "compile: %s; link: %s" % (" ".join(cflags), " ".join(ldflags) or "-")
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = ldflags
            ext.define_macros += [
                ("FASTBN_BUILD_FLAGS", '"%s"' % flags_text),
                ("FASTBN_HAVE_OPENMP", "1" if openmp else "0"),
            ]
        super().build_extensions()


def extensions():
    checks = os.environ.get("FASTBN_BOUNDSCHECK") == "1"
    directives = {
        "language_level": 3,
        "boundscheck": checks,
        "wraparound": checks,
        "cdivision": True,
        "initializedcheck": checks,
        "embedsignature": True,
    }
    exts = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            include_dirs=[np.get_include(), "fastbn"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=["fastbn/_simd.h", "fastbn/_simd_impl.h", "fastbn/_pool.h", "fastbn/_alloc.h"],
        )
        for name in ("fastbn._openmp", "fastbn._kernels", "fastbn._alloc")
    ]
    return cythonize(exts, compiler_directives=directives)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
