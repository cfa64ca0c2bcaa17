"""Refusing a request that cannot fit in memory before allocating it, with the estimate.

A huge `model.hidden_size`, `generate.num_chars` or `beam_width` would otherwise end in a
`MemoryError` traceback or in the process being killed. Components estimate what a request
needs (roughly: the big arrays, not every small object) and call `check`, which compares the
estimate with the memory this machine has available and raises one clear line.
"""

from __future__ import annotations

import os

from charrnn.errors import ConfigError

ALWAYS_FITS = 32 << 20  # bytes; smaller requests are not checked (reading /proc/meminfo takes ~50 us)


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux) in bytes, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (containers), else None."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still use: MemAvailable (else physical memory), within a cgroup limit.

    None when the platform says nothing, and then nothing is refused.
    """
    found = _meminfo_available()
    if found is None:
        try:
            found = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            found = None
    group = _cgroup_available()
    if group is not None:
        found = group if found is None else min(found, group)
    return found


def format_bytes(n: float) -> str:
    """`n` bytes for people: `512 bytes`, `3.2 MiB`, `120 GiB`."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 10 else f"{n:,.0f} {unit}"
    raise AssertionError("unreachable")


def check(nbytes: float, what: str, parts: str = "", hint: str = "") -> None:
    """ConfigError unless about `nbytes` fit in the available memory.

    The message reads "`what` needs about N GiB of memory (`parts`); this machine has M GiB
    available`hint`", e.g. what="model.hidden_size=100000", parts="parameters, gradients",
    hint="; use --stream".
    """
    if nbytes < ALWAYS_FITS:
        return  # generation calls this per sample: keep small requests free
    available = available_bytes()
    if available is None or nbytes <= available:
        return
    detail = f" ({parts})" if parts else ""
    raise ConfigError(
        f"{what} needs about {format_bytes(nbytes)} of memory{detail}; "
        f"this machine has {format_bytes(available)} available{hint}"
    )
