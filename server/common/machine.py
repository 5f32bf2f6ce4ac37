"""What the machine offers, for sizes left to be chosen at start-up (0 in the settings)."""

from __future__ import annotations

import os

HOST_SHARE = 8  # a sized-from-the-machine host buffer takes 1/HOST_SHARE of the available memory


def available_host_bytes() -> int:
    """Host memory available to new allocations without swapping (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def host_share_bytes() -> int:
    return available_host_bytes() // HOST_SHARE
