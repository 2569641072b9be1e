"""What fastbn reads about the machine at import: the cores it may use and the data cache sizes.

The kernels size some of their work by the caches (see ``_kernels.tune_for``): these come from
Linux's sysfs (``/sys/devices/system/cpu/cpuN/cache/index*``, per cache instance, with the CPUs
that share it), else from ``sysconf(_SC_LEVEL*_CACHE_SIZE)`` (glibc), else from safe defaults.
sysfs comes first because glibc's sysconf can be far off under a hypervisor: on this project's
2-core AMD EPYC (Zen 4) VM it says 320 MiB of L3 where sysfs (and lscpu) say 32 MiB.
"""
import os

# The previous machine's sizes, where nothing better can be read: safe for the thresholds derived
# from them (a larger guess would keep outputs of large calls in the cache that cannot hold them).
DEFAULTS = {"l1d": 32 << 10, "l2": 1 << 20, "l3": 32 << 20}

# A VM with a few vCPUs sees its host's whole L3 (sysfs lists only the guest's own CPUs as
# sharing it), but shares it with every other guest on that socket: the L3 fastbn counts on is at
# most this much per usable core.  No x86 core has more than 12 MiB of L3 to itself today
# (AMD's 3D V-Cache parts), so on bare metal this never binds.
L3_PER_CORE_MAX = 16 << 20

_SYSFS = "/sys/devices/system/cpu"


def usable_cores():
    """CPUs this process may run on (its affinity mask), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return [0]


def _parse_size(text):
    """sysfs cache sizes: '32K', '1024K', '32768K', '2M' (bytes)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


def _parse_cpu_list(text):
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _sysfs_caches(cpu):
    """{(level, type): (size bytes, set of CPUs sharing it)} for one CPU, or {} without sysfs."""
    caches = {}
    base = f"{_SYSFS}/cpu{cpu}/cache"
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        return caches
    for entry in entries:
        try:
            level = int(_read(f"{base}/{entry}/level"))
            kind = _read(f"{base}/{entry}/type")
            size = _parse_size(_read(f"{base}/{entry}/size"))
            shared = _parse_cpu_list(_read(f"{base}/{entry}/shared_cpu_list"))
        except (OSError, ValueError):
            continue
        if size and kind in ("Data", "Unified"):
            caches[(level, kind)] = (size, shared or {cpu})
    return caches


def _sysconf(name):
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return None
    return value if value and value > 0 else None


def detect():
    """A dict: usable cores; L1d, L2 (per core) and L3 (per instance) in bytes; the L3 instances the
    usable CPUs span, the CPUs that share one, ``l3_effective`` (what the kernels' thresholds use:
    the instances spanned times their size, at most L3_PER_CORE_MAX per usable core); and where
    each figure came from ("sysfs", "sysconf", "default")."""
    cpus = _cpus()
    info = {"cores": usable_cores()}
    first = _sysfs_caches(cpus[0]) if cpus else {}
    found = {
        "l1d": first.get((1, "Data")),
        "l2": first.get((2, "Unified")) or first.get((2, "Data")),
        "l3": first.get((3, "Unified")) or first.get((3, "Data")),
    }
    names = {"l1d": "SC_LEVEL1_DCACHE_SIZE", "l2": "SC_LEVEL2_CACHE_SIZE", "l3": "SC_LEVEL3_CACHE_SIZE"}
    source = {}
    for key in ("l1d", "l2", "l3"):
        if found[key]:
            info[key], source[key] = found[key][0], "sysfs"
        elif _sysconf(names[key]):
            info[key], source[key] = _sysconf(names[key]), "sysconf"
        else:
            info[key], source[key] = DEFAULTS[key], "default"
    instances, shared = 1, None
    if found["l3"]:
        shared = len(found["l3"][1])
        covered, instances = set(found["l3"][1]), 1
        for cpu in cpus:  # one sysfs read per further L3 instance the usable CPUs reach
            if cpu not in covered:
                other = _sysfs_caches(cpu).get((3, "Unified"))
                covered |= other[1] if other else {cpu}
                instances += 1
    info["l3_instances"] = instances
    info["l3_shared_by"] = shared
    info["l3_effective"] = min(info["l3"] * instances, L3_PER_CORE_MAX * info["cores"])
    info["source"] = source
    return info


CACHES = detect()
