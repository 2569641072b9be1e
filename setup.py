"""Build fastbn's Cython extensions, with OpenMP where the compiler has it.

Environment switches:
  FASTBN_REQUIRE_OPENMP=1   fail the build instead of falling back to serial kernels
  FASTBN_DISABLE_OPENMP=1   build serial kernels even where OpenMP works (tests the fallback)
  FASTBN_MARCH_NATIVE=1     add -march=native (not portable: only for a build you run where you built it)
  FASTBN_BOUNDSCHECK=1      turn Cython bounds and wraparound checks back on (debugging)
  FASTBN_DEBUG=1            keep debug information and symbols (other builds are stripped)
  FASTBN_SANITIZE=address,undefined
                            build with these sanitizers (for tests: see docs/developing.md)
  FASTBN_LIBOMP_PREFIX=dir  macOS: where libomp is (default: `brew --prefix libomp`)

The switches, the compiler and every flag it gets are the build's identity.  It is recorded in
the build folder, and when it differs from the one the existing extensions were built with, every
extension is rebuilt (setuptools alone would keep an extension whose sources did not change, and
mix builds).  Each compiled module reports its identity as BUILD_FLAGS; `fastbn info` prints them.
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import Cython
import numpy as np
from Cython.Distutils import build_ext as cython_build_ext
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# setuptools' build_ext derives from Cython's where Cython is importable (a build requirement):
# Cython then runs as each extension is built, not when this file is loaded, so the sdist lists
# the .pyx sources, and Cython writes its C under build/, never into the source tree.
if not issubclass(build_ext, cython_build_ext):
    raise RuntimeError("setuptools does not use Cython's build_ext: upgrade setuptools and Cython")

SWITCHES = ("FASTBN_REQUIRE_OPENMP", "FASTBN_DISABLE_OPENMP", "FASTBN_MARCH_NATIVE", "FASTBN_BOUNDSCHECK",
            "FASTBN_DEBUG", "FASTBN_SANITIZE", "FASTBN_LIBOMP_PREFIX")
SANITIZERS = ("address", "undefined")
IDENTITY_FILE = "fastbn-build-identity.json"

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


def _on(name):
    return os.environ.get(name) == "1"


def _sanitizers():
    """The sanitizers FASTBN_SANITIZE asks for (a comma-separated list), checked."""
    value = os.environ.get("FASTBN_SANITIZE", "")
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SANITIZERS]
    if unknown:
        raise RuntimeError(f"FASTBN_SANITIZE={value!r}: unknown {', '.join(unknown)}; "
                           f"expected a comma-separated list of {', '.join(SANITIZERS)}")
    return names


def _one_line(text, limit=400):
    """What a tool said, as one line: its error lines (else its last lines), ASCII, without ';'
    (BUILD_FLAGS' field separator)."""
    text = str(text).translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'})
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if any(w in line.lower() for w in ("error", "cannot find", "undefined"))]
    line = " / ".join(errors[:2] or lines[-3:]).replace(";", ",") or "no output"
    line = line.encode("ascii", "replace").decode("ascii")
    return line if len(line) <= limit else line[:limit] + "..."


def _libomp_prefix():
    """macOS: the libomp installation (FASTBN_LIBOMP_PREFIX, else Homebrew's), or None."""
    prefix = os.environ.get("FASTBN_LIBOMP_PREFIX")
    if not prefix:
        try:
            prefix = subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True,
                                    timeout=120).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            prefix = ""
    candidates = [prefix] if prefix else ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    return next((p for p in candidates if os.path.isfile(os.path.join(p, "include", "omp.h"))), None)


def _openmp_flags(compiler_type):
    """(compile flags, link flags) that turn OpenMP on for this compiler."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang: libomp from Homebrew (its install name is absolute: no rpath)
        prefix = _libomp_prefix()
        inc, lib = ([f"-I{prefix}/include"], [f"-L{prefix}/lib"]) if prefix else ([], [])
        return ["-Xpreprocessor", "-fopenmp"] + inc, lib + ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _probe_openmp(compiler, cflags, ldflags):
    """Compile, link and *run* a tiny OpenMP program with the build's own flags.

    Returns None when that works, else what failed and the tool's last words (one line).
    """
    tmp = tempfile.mkdtemp(prefix="fastbn-omp-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("probe.c", "w") as f:
            f.write(OPENMP_PROBE)
        exe = os.path.join(tmp, "probe.exe" if compiler.compiler_type == "msvc" else "probe")
        if compiler.compiler_type == "msvc":  # distutils' own calls (their output goes to the console)
            try:
                objs = compiler.compile(["probe.c"], extra_postargs=cflags)
                compiler.link_executable(objs, "probe", extra_postargs=ldflags)
            except Exception as exc:
                return f"building the probe failed: {_one_line(exc)}"
        else:  # the same commands distutils would run, with their output captured for the reason
            steps = [("compiling", list(compiler.compiler_so) + ["-c", "probe.c", "-o", "probe.o"] + cflags),
                     ("linking", list(compiler.linker_exe) + ["probe.o", "-o", exe] + ldflags)]
            for what, cmd in steps:
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                except (OSError, subprocess.SubprocessError) as exc:
                    return f"{what} the probe failed: {_one_line(exc)}"
                if r.returncode != 0:
                    return f"{what} the probe failed ({cmd[0]}, exit {r.returncode}): {_one_line(r.stderr + r.stdout)}"
        try:
            r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"running the probe failed: {_one_line(exc)}"
        if r.returncode != 0 or r.stdout.strip() != "1":
            return f"running the probe failed (exit {r.returncode}): {_one_line(r.stderr + r.stdout)}"
        return None
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def _compiler_version(compiler):
    """The first line of `cc --version` (the identity of the compiler, not only its name)."""
    if compiler.compiler_type == "msvc":
        return "msvc"
    cmd = list(compiler.compiler_so)
    exe = cmd[1] if os.path.basename(cmd[0]) in ("ccache", "sccache") and len(cmd) > 1 else cmd[0]
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return _one_line(out.strip().splitlines()[0]) if out.strip() else exe


def _is_rpath(arg):
    return arg.startswith(("-Wl,-rpath", "-Wl,-R")) or (arg.startswith("-R") and len(arg) > 2)


def _drop_python_rpaths(compiler):
    """Take the run paths out of Python's own link command (a pyenv or custom-prefix Python puts its
    lib/ folder there): fastbn's modules need none, and a wheel must not carry a path into the
    build machine.  Run paths in $LDFLAGS stay: those were asked for."""
    python_args = shlex.split(sysconfig.get_config_var("LDSHARED") or "") + shlex.split(sysconfig.get_config_var("LDFLAGS") or "")
    asked = set(shlex.split(os.environ.get("LDFLAGS", "")))
    drop = {a for a in python_args if _is_rpath(a)} - asked
    for attr in ("linker_so", "linker_so_cxx", "linker_exe", "linker_exe_cxx"):
        cmd = getattr(compiler, attr, None)
        if isinstance(cmd, list):
            setattr(compiler, attr, [a for a in cmd if a not in drop])


def _c_string(text):
    """A C string literal of text (ASCII)."""
    text = text.encode("ascii", "replace").decode("ascii")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExt(build_ext):
    """Per-compiler flags, the OpenMP decision, and a rebuild of everything when they change."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:  # pip passes no -j: compile the extensions side by side on every core
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        sanitize = _sanitizers()
        if ctype == "msvc":
            if sanitize:
                raise RuntimeError("FASTBN_SANITIZE needs GCC or clang")
            cflags, ldflags = ["/O2"], []
        else:
            # -fopenmp-simd honours `#pragma omp simd` (vectorized reductions) even without
            # OpenMP threads; no -ffast-math: NaN/Inf must propagate like PyTorch's.  -pthread:
            # the kernels' thread pool.  These come after Python's own flags (-O3 among them).
            cflags, ldflags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-pthread"], ["-pthread"]
            if _on("FASTBN_MARCH_NATIVE"):
                cflags.append("-march=native")
            if sanitize:
                # -fwrapv (in Python's flags) defines signed overflow, which UBSan must see as an error
                self.compiler.compiler_so = [a for a in self.compiler.compiler_so if a != "-fwrapv"]
                cflags += ["-fsanitize=" + ",".join(sanitize), "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
                ldflags += ["-fsanitize=" + ",".join(sanitize)]
            elif _on("FASTBN_DEBUG"):
                cflags.append("-g")
            else:  # release: no debug information (Python's flags have -g), no symbol table
                cflags.append("-g0")
                ldflags += ["-Wl,-S,-x"] if sys.platform == "darwin" else ["-s"]
            _drop_python_rpaths(self.compiler)

        omp_c, omp_l = _openmp_flags(ctype)
        if _on("FASTBN_DISABLE_OPENMP"):
            if _on("FASTBN_REQUIRE_OPENMP"):
                raise RuntimeError("FASTBN_DISABLE_OPENMP=1 and FASTBN_REQUIRE_OPENMP=1 contradict each other")
            why = "switched off on purpose: FASTBN_DISABLE_OPENMP=1"
        else:
            # with the build's own flags (sanitizers included): what fails here would fail below
            failure = _probe_openmp(self.compiler, cflags + omp_c, ldflags + omp_l)
            why = None if failure is None else f"the OpenMP probe failed: {failure}"
        if why is None:
            cflags += omp_c
            ldflags += omp_l
            openmp_note = "on (" + " ".join(omp_c) + ")"
        else:
            openmp_note = f"OFF ({why})"
            msg = f"fastbn: building SERIAL kernels (one thread): {why}."
            if not _on("FASTBN_DISABLE_OPENMP"):
                msg += (" On macOS: `brew install libomp` (or set FASTBN_LIBOMP_PREFIX)."
                        " Set FASTBN_REQUIRE_OPENMP=1 to make this an error.")
                if _on("FASTBN_REQUIRE_OPENMP"):
                    raise RuntimeError(msg)
            warnings.warn(msg)
            print("\n" + "!" * 78 + "\n" + msg + "\n`fastbn info` repeats this.\n" + "!" * 78 + "\n", file=sys.stderr)

        compiler = _compiler_version(self.compiler)
        build_flags = (f"openmp: {openmp_note}; compiler: {compiler}; compile flags: {' '.join(cflags)}; "
                       f"link flags: {' '.join(ldflags) or '-'}")
        identity = {
            "build_flags": build_flags,
            "compile": list(self.compiler.compiler_so) if ctype != "msvc" else [],
            "link": list(getattr(self.compiler, "linker_so", [])) if ctype != "msvc" else [],
            "switches": {name: os.environ.get(name, "") for name in SWITCHES},
            "cython": Cython.__version__,
            "numpy": np.__version__,
        }
        self._rebuild_all_if_identity_changed(identity)
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = ldflags
            ext.define_macros = [m for m in ext.define_macros if m[0] not in ("FASTBN_BUILD_FLAGS", "FASTBN_HAVE_OPENMP")]
            ext.define_macros += [
                ("FASTBN_BUILD_FLAGS", _c_string(build_flags)),
                ("FASTBN_HAVE_OPENMP", "1" if why is None else "0"),
            ]
        super().build_extensions()
        self._record_identity(identity)

    # -- the build's identity: built outputs -> the identity they were built with
    def _identity_path(self):
        return os.path.join(self.build_temp, IDENTITY_FILE)

    def _outputs(self):
        return [os.path.abspath(self.get_ext_fullpath(ext.name)) for ext in self.extensions]

    def _recorded(self):
        try:
            with open(self._identity_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _rebuild_all_if_identity_changed(self, identity):
        recorded = self._recorded()
        stale = [out for out in self._outputs() if os.path.exists(out) and recorded.get(out) != identity]
        if stale and not self.force:
            print(f"fastbn: {os.path.basename(stale[0])} was built with other switches, compiler or flags "
                  "(or nothing recorded them): rebuilding every extension", file=sys.stderr)
            self.force = True

    def _record_identity(self, identity):
        recorded = self._recorded()
        recorded.update({out: identity for out in self._outputs()})
        os.makedirs(self.build_temp, exist_ok=True)
        with open(self._identity_path(), "w") as f:
            json.dump(recorded, f, indent=1, sort_keys=True)


def extensions():
    checks = _on("FASTBN_BOUNDSCHECK")
    directives = {
        "language_level": 3,
        "boundscheck": checks,
        "wraparound": checks,
        "cdivision": True,
        "initializedcheck": checks,
        "embedsignature": True,
    }
    # Every header, .pxd and .pxi is a dependency of every extension: a change to any of them rebuilds them all.
    depends = sorted(glob.glob("fastbn/*.h") + glob.glob("fastbn/*.pxd") + glob.glob("fastbn/*.pxi"))
    exts = []
    # _pool: the thread pool; _plan: the work-split planner; _kernels: batch norm; _floor: the
    # benchmark's floor; _norm_kernels: group / layer / instance norm (issue 13)
    for name in ("fastbn._openmp", "fastbn._pool", "fastbn._plan", "fastbn._kernels", "fastbn._floor",
                 "fastbn._norm_kernels", "fastbn._alloc", "fastbn._fastpath"):
        ext = Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            include_dirs=[np.get_include(), "fastbn"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=depends,
        )
        ext.cython_directives = directives
        ext.cython_c_in_temp = True  # generated C under build/
        exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
