"""User-facing errors: one line that says what was expected, what was given and how to list choices.

The CLI prints ``PosprobeError`` messages on stderr and exits with code 2; library users catch them. An OS error
(a full disk, a read-only folder, a name too long) is printed the same way, by ``describe_os_error``.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class PosprobeError(ValueError):
    """A problem with the user's input or environment that the user can fix."""


_OS_HINTS = {
    errno.ENOSPC: "free space there or choose another --out / --cache-dir",
    errno.EDQUOT: "free space there or choose another --out / --cache-dir",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EPERM: "check the permissions or choose another folder",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: the path(s), the reason and its errno name, and what to do for the usual ones,
    e.g. "/data/run/metrics.json: No space left on device (ENOSPC); free space there or choose another --out"."""
    reason = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno) if isinstance(err.errno, int) else None
    reason += f" ({code})" if code else ""
    paths = [
        os.fsdecode(f) if isinstance(f, (str, bytes)) else str(f)
        for f in (err.filename, err.filename2)
        if f is not None
    ]
    where = " -> ".join(paths)
    hint = _OS_HINTS.get(err.errno)
    return (f"{where}: " if where else "") + reason + (f"; {hint}" if hint else "")


def unknown_choice(
    what: str, given: str, valid: Iterable[str], list_hint: str = "", max_listed: int | None = None
) -> PosprobeError:
    """Build the error for an unknown name, listing the valid ones and suggesting the closest.

    ``max_listed`` keeps the line readable when there are hundreds of choices (timm models, graph nodes):
    only the first ones are listed, with the total, and the hint says where to see them all.
    """
    valid = list(valid)
    close = difflib.get_close_matches(str(given), valid, n=1, cutoff=0.5)
    if not close:  # case-insensitive fallback: "h" -> "H", "VGG16" -> "vgg16"
        lowered = {v.lower(): v for v in valid}
        close = [lowered[given.lower()]] if str(given).lower() in lowered else []
    suggestion = f" Did you mean '{close[0]}'?" if close else ""
    hint = f" ({list_hint})" if list_hint else ""
    listed = ", ".join(valid)
    if max_listed is not None and len(valid) > max_listed:
        listed = f"{', '.join(valid[:max_listed])}, ... ({len(valid)} in all)"
    return PosprobeError(f"unknown {what} '{given}'; expected one of: {listed}.{suggestion}{hint}")


def parse_choices(text: str, option: str, what: str, valid: Iterable[str]) -> tuple[str, ...]:
    """'a, b,a' -> ('a', 'b'): a comma list of ``valid`` names given to ``option``, in order, duplicates dropped;
    an empty list or an unknown name is a one-line ``PosprobeError``."""
    valid = list(valid)
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise PosprobeError(f"{option} needs at least one of {', '.join(valid)}; given '{text}'")
    for item in items:
        if item not in valid:
            raise unknown_choice(what, item, valid)
    return items
