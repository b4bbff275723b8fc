"""The one exception type that the CLI turns into a single line on stderr and exit status 2,
and the words for the operating-system failures a user can fix (a full disk, a read-only mount)."""
from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user (a path, a preset, a config key, a device): no traceback is shown."""


_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory",
    errno.EIO: "input/output error (a failing disk or a lost network mount?)",
}


def os_reason(e: OSError) -> str:
    """A short lower-case phrase for `e` ("no space left on device"), never a traceback."""
    return _OS_REASONS.get(e.errno) or (e.strerror or str(e)).lower()
