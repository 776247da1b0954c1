"""Memory a piece of work needs against the memory this machine has: a setting whose work certainly
cannot fit is refused before anything is allocated, with one line naming it.

Every estimate here is a *lower bound* (only what the work must hold at once: a model's weights,
gradients and optimizer state, the activations a backward pass keeps, the tokens a generation returns),
so a refusal is certain: a run that is refused would have run out of memory, and a run that could fit is
never refused. The machine's memory is ``MemTotal`` of ``/proc/meminfo`` (else the physical pages
``os.sysconf`` reports) for the CPU, and the device's total memory for a CUDA device; where neither is
known nothing is refused.

This module imports nothing from the library (every layer may use it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

FLOAT32 = 4  # bytes
BFLOAT16 = 2
INT64 = 8
ADAMW_BYTES_PER_PARAMETER = 4 * FLOAT32  # weight, gradient, exp_avg, exp_avg_sq (float32 each)
_UNITS = ("bytes", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


DEVICE_TYPES = ("cpu", "cuda")  # where a model or block memory may live


def check_device(value: str | torch.device | None, option: str = "--device") -> None:
    """Refuse a device name torch does not know, or a device this machine does not have (a ValueError
    naming ``option``)."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {value!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"{option} {value!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {value}: this torch has no CUDA device (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {value}: only {torch.cuda.device_count()} CUDA device(s) here")


class ResourceError(ValueError):
    """Work that certainly cannot fit in this machine's memory; the one-line message names the setting."""


def format_bytes(n: float) -> str:
    """``1.3 TB``, ``23 GB``, ``512 bytes`` (decimal units, two significant digits)."""
    if not math.isfinite(n):
        return "infinitely many bytes"
    value, unit = float(n), 0
    while value >= 1000 and unit < len(_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    if unit == 0:
        return f"{int(value)} bytes"
    if value >= 1000:  # beyond the largest unit
        return f"{n:.2g} bytes"
    return f"{value:.2g} {_UNITS[unit]}" if value < 10 else f"{value:.0f} {_UNITS[unit]}"


def _meminfo_total(path: str = "/proc/meminfo") -> int | None:
    """MemTotal in bytes, or None when the file is missing or has no such line."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    parts = line.split()
                    return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else None
    except OSError:
        return None
    return None


def cpu_memory() -> int | None:
    """This machine's memory in bytes (MemTotal), or None when it cannot be read."""
    total = _meminfo_total()
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            return None
    return total if total and total > 0 else None


@dataclass(frozen=True)
class Capacity:
    """The memory of the device some work runs on: ``total`` bytes (None: unknown), and how the message
    names it (``this machine``, ``cuda:0``)."""

    total: int | None
    name: str


def capacity(device: str | torch.device | None = None) -> Capacity:
    """The memory of ``device`` (None or a CPU: this machine's memory; ``cuda`` / ``cuda:N``: the
    device's total memory, None when there is no such device)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Capacity(None, str(device))
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return Capacity(None, str(device))
        return Capacity(torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}")
    if device.type == "cpu":
        return Capacity(cpu_memory(), "this machine")
    return Capacity(None, str(device))


def shortfall(need: float, device: str | torch.device | None = None) -> Capacity | None:
    """The device's capacity when ``need`` bytes exceed it, else None (it fits, or it is unknown)."""
    cap = capacity(device)
    return cap if cap.total is not None and need > cap.total else None


def processes_sharing_memory(device_type: str) -> int:
    """How many processes of this job hold their own copy of the work in one memory: torchrun's
    LOCAL_WORLD_SIZE on the CPU (they share the machine), 1 on CUDA (one device each)."""
    if device_type == "cuda":
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_fits(need: float, setting: str, what: str, device: str | torch.device | None = None) -> None:
    """Raise ResourceError ``"<setting>: <what> needs at least <need>, <device> has <total>"`` when
    ``need`` bytes (a lower bound) exceed the device's memory; nothing when they fit or it is unknown."""
    cap = shortfall(need, device)
    if cap is not None:
        raise ResourceError(
            f"{setting}: {what} needs at least {format_bytes(need)}, {cap.name} has {format_bytes(cap.total)}"
        )


def blamed(need, values: dict[str, object], defaults: dict[str, object]) -> str | None:
    """The setting that makes ``need(values)`` large: of the ``values`` that differ from ``defaults``,
    the one whose default lowers the estimate most (None when no default lowers it)."""
    base, best, name = need(values), 0.0, None
    for key, value in values.items():
        if key not in defaults or defaults[key] == value:
            continue
        lower = base - need({**values, key: defaults[key]})
        if lower > best:
            best, name = lower, key
    return name
