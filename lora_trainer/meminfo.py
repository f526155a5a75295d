"""System memory as Linux reports it in ``/proc/meminfo``: the one reader the memory plan and the
workshop's worker count share."""

from __future__ import annotations

MEMINFO = "/proc/meminfo"

__all__ = ["MEMINFO", "meminfo_bytes"]


def meminfo_bytes(field: str, path: str = MEMINFO) -> int | None:
    """Bytes of ``field`` (e.g. "MemAvailable", "MemTotal"); None where it cannot be read (not Linux,
    a restricted container, a malformed line)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    parts = line.split()
                    unit = parts[2].lower() if len(parts) > 2 else "kb"
                    return int(parts[1]) * (1024 if unit == "kb" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
