"""Whether adatsq draws progress bars: asked for (`progress=True`, no `--quiet`) and not switched off by
TQDM_DISABLE; every bar also passes `disable=None`, so tqdm hides it when stderr is not a terminal.

tqdm reads TQDM_* variables only as defaults of the arguments a caller leaves out, and adatsq's bars pass
`disable` explicitly, so the variable is read here, as tqdm reads it (any non-empty value disables).
"""

from __future__ import annotations

import os


def bars_wanted(progress: bool = True) -> bool:
    """`progress`, unless TQDM_DISABLE is set to a non-empty value."""
    return bool(progress) and not os.environ.get("TQDM_DISABLE")


def tqdm_disable(progress: bool = True) -> bool | None:
    """tqdm's `disable`: None (shown on a terminal only) when bars are wanted, else True."""
    return None if bars_wanted(progress) else True
