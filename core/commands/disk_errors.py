"""One line for an error of the disk or a folder (full, read-only, no permission), instead of a traceback.

Every write of the toolkit is atomic, so such an error leaves the file it was writing as it was
(its temporary file removed) and every cache valid to resume; the line says what happened, to
which file, and that running the same command again after fixing it resumes the work.
"""

from __future__ import annotations

import errno

FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def disk_error_line(e: OSError, resumes: str = "finished cache shards are kept") -> str:
    """``error: ...`` in one line for an ``OSError`` met during the work (the caller exits with 1)."""
    where = f"{e.filename}: " if e.filename else ""
    what = (e.strerror or str(e) or type(e).__name__).splitlines()[0]
    if e.errno in FULL:
        fix = "free space"
    elif e.errno in READ_ONLY:
        fix = "make the folder writable or choose another"
    else:
        return f"error: {where}{what}" + (f" [Errno {e.errno}]" if e.errno is not None else "")
    return f"error: {where}{what} [Errno {e.errno}]; nothing half-written is left and {resumes}: {fix}, then run the same command again"
