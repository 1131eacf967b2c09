"""Writes the OS refuses, for the tests of what a full disk does (dataset.write_atomic)."""
import contextlib
import re
import resource
import signal


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Files of this process may not grow past nbytes: the OS refuses the write that would (EFBIG, 'File too
    large'), as it refuses one on a full disk (ENOSPC) or over a quota, with no root needed to fill a disk."""
    old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def refused_write(path):
    """The one line a refused write of `path` gives (dataset.write_atomic)."""
    return (rf'could not write {re.escape(str(path))}: File too large \(after \d+(\.\d)? (bytes|KB|MB) of it; '
            rf'\d+(\.\d)? (bytes|KB|MB|GB) free on its disk\)')
