"""Memory sizes as users write them ('768MiB', '40GiB', '1.5GB', '123456') and as reports print them."""

from __future__ import annotations

import math
import re

from adatsq.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MAX_SIZE = 2**63  # bytes: what a signed 64-bit count holds
_SIZE = re.compile(r"^\s*(?P<value>\d+(\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'768MiB' | '40GiB' | '1.5GB' | '123456' -> bytes (binary units are 1024-based, decimal 1000-based)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if 0 <= text < MAX_SIZE:
            return text
        raise ConfigError(f"memory size {text:.3g} bytes must be in 0..2**63-1; write e.g. 40GiB")
    match = _SIZE.match(str(text))
    unit = match["unit"].lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"memory size {_short(str(text))} is not a size; write bytes with an optional unit "
            f"({', '.join(u for u in ('KiB', 'MiB', 'GiB', 'TiB', 'KB', 'MB', 'GB', 'TB'))}), "
            "e.g. 768MiB, 40GiB, 1.5GB or 123456"
        )
    value = float(match["value"]) * _UNITS[unit]
    if not value < MAX_SIZE:  # also inf (a few hundred digits overflow a float)
        raise ConfigError(
            f"memory size {_short(str(text))} is beyond {MAX_SIZE} bytes (8 EiB); write e.g. 40GiB"
        )
    return int(value)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:30]!r}... ({len(text)} characters)"


def exact_size(n: int) -> str:
    """'62.9 GiB (67448954880 B)': the short size (rounded up) and the exact bytes."""
    short = format_size(n, up=True)
    return short if short.endswith(" B") else f"{short} ({n} B)"


def format_size(n: float, up: bool = False) -> str:
    """Bytes as a short binary size ('62.8 GiB'); `up` rounds up, so a printed budget is always enough."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = math.ceil(n / scale * 10) / 10 if up else n / scale
            return f"{value:.1f} {unit}"
    return f"{int(n)} B"
