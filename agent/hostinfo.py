"""Facts about the host that choose defaults: CPU vendor and model, core count."""

from __future__ import annotations

import os
from functools import cache


@cache
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD" or "" when unknown."""
    return _cpuinfo().get("vendor_id", "")


def cpu_model() -> str:
    return _cpuinfo().get("model name", "unknown")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when unknown)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cores() -> int:
    """Cores this process may run on (respects CPU affinity and systemd's CPUAffinity=)."""
    return len(os.sched_getaffinity(0))
