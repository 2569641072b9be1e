"""CI: check what the sdist holds and what pip installed from it.

    python .ci/check_dist.py sdist DIST.tar.gz   every tracked source of fastbn/ and tests/ (so every
                                                 header, .pyx, .pxd, .cu, stub, and the CUDA emulator's
                                                 C++ and README), LICENSE, README, and no generated
                                                 C, compiled module or cache
    python .ci/check_dist.py installed           run with the venv's python: the installed fastbn's
                                                 modules are stripped and carry no RPATH/RUNPATH,
                                                 and it has py.typed, its stubs and every
                                                 subpackage's modules (fastbn/bench/)
"""
import glob
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_sdist(path):
    with tarfile.open(path) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    held = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    tracked = subprocess.run(["git", "ls-files", "fastbn", "tests"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    want = set(tracked) | {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO"}
    missing = sorted(want - held)
    junk = sorted(n for n in held if n.endswith((".so", ".pyd", ".o", ".pyc")) or "__pycache__" in n
                  or (n.startswith("fastbn/") and n.endswith((".c", ".cpp"))) or n.startswith(("build/", "dist/")))
    for name in ("fastbn/_kernels.pyx", "fastbn/_openmp.pyx", "tests/conftest.py", "tests/_helpers.py",
                 "tests/cuda_emulator/scheduler.cpp", "tests/cuda_emulator/README.md", "fastbn/py.typed"):
        if name not in held:
            missing.append(name)
    problems = [f"missing from the sdist: {n}" for n in missing] + [f"should not be in the sdist: {n}" for n in junk]
    print(f"{os.path.basename(path)}: {len(held)} entries, {os.path.getsize(path) // 1024} KiB")
    return problems


def check_installed():
    import fastbn

    pkg = os.path.dirname(os.path.abspath(fastbn.__file__))
    problems = []
    for name in ("py.typed", "_kernels.pyi", "_openmp.pyi", "functional.pyi", "layers.pyi", "_layer_base.pyi",
                 "norms.pyi", "norm_layers.pyi", "_grad_mode.pyi", "_alloc.pyi", "_fastpath.pyi", "_floor.pyi", "_plan.pyi", "_pool.pyi",
                 "sync.pyi", "fusion.pyi"):
        if not os.path.exists(os.path.join(pkg, name)):
            problems.append(f"the installed package has no {name}")
    # every subpackage of the source tree (pyproject.toml's packages list names each one)
    for init in sorted(glob.glob(os.path.join(ROOT, "fastbn", "*", "__init__.py"))):
        sub = os.path.relpath(os.path.dirname(init), os.path.join(ROOT, "fastbn"))
        for source in sorted(glob.glob(os.path.join(os.path.dirname(init), "*.py"))):
            name = os.path.join(sub, os.path.basename(source))
            if not os.path.exists(os.path.join(pkg, name)):
                problems.append(f"the installed package has no {name} (is fastbn.{sub} in pyproject.toml's packages?)")
    modules = sorted(glob.glob(os.path.join(pkg, "*.so")))
    readelf = shutil.which("readelf")
    for so in modules:
        print(f"{os.path.basename(so)}: {os.path.getsize(so) // 1024} KiB")
        if readelf is None:
            continue
        dynamic = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
        sections = subprocess.run([readelf, "-S", so], capture_output=True, text=True, check=True).stdout
        if "RPATH" in dynamic or "RUNPATH" in dynamic:
            problems.append(f"{so} has a run path: " + " ".join(line.strip() for line in dynamic.splitlines() if "PATH" in line))
        for section in (".symtab", ".debug_info"):
            if section in sections:
                problems.append(f"{so} is not stripped (it has {section})")
    if readelf is None:
        print("readelf not found: run paths and stripping not checked")
    return problems


def main(argv):
    if argv[:1] == ["sdist"] and len(argv) == 2:
        problems = check_sdist(argv[1])
    elif argv == ["installed"]:
        problems = check_installed()
    else:
        sys.exit(__doc__)
    for p in problems:
        print("FAIL:", p)
    print("check_dist:", "FAILED" if problems else "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
