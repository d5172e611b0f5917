"""One wording and one exit code for a full disk, whoever writes (checkpoints, LMDBs, images).

Libraries report ENOSPC in their own words: torch's zip writer says ``enforce fail at
inline_container.cc ... unexpected pos``, py-lmdb raises ``lmdb.DiskError`` or an
``lmdb.Error`` with "No space left on device", Python raises ``OSError(errno.ENOSPC)``.
Writers catch what they see, and :func:`raise_if_disk_full` turns it into a
:class:`DiskFullError` naming the path when the disk (or quota) is the cause.
Entry points exit with :data:`DISK_FULL_EXIT_CODE` on it (1 stays "an input failed").
"""
import errno
import os
import shutil

DISK_FULL_EXIT_CODE = 2

# Words libraries use when a write failed for lack of space.
_DISK_FULL_WORDS = ('no space left', 'disk quota exceeded', 'enospc')
# Words of a short write that may have other causes (torch's zip writer, LMDB's commit on a full tmpfs):
# trusted only while the file system is (nearly) full, probed at once, before the writer cleans up.
_SHORT_WRITE_WORDS = ('unexpected pos', 'file write failed', 'pytorchstreamwriter failed writing',
                      'input/output error')


class DiskFullError(OSError):
    """A write failed because ``path``'s file system is full; the message names the path."""

    def __init__(self, path: str, detail: str = ''):
        self.path = str(path)
        free = free_bytes(self.path)
        where = f' ({free / 1024 ** 2:.1f} MiB free when the write failed)' if free is not None else ''
        super().__init__(errno.ENOSPC, f'no space left on {self.path}{where}: free some space or write elsewhere'
                         + (f' [{detail}]' if detail else ''))

    def __str__(self):
        return self.strerror


def free_bytes(path: str):
    """Free bytes of the file system holding ``path`` (its nearest existing parent); None if unknown."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) reports a full disk or quota."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err).lower()
        if any(word in text for word in _DISK_FULL_WORDS):
            return True
        if any(word in text for word in _SHORT_WRITE_WORDS) and _nearly_full(getattr(err, '_yoda_path', None)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _nearly_full(path, margin: int = 64 * 1024 ** 2) -> bool:
    if path is None:
        return False  # no path to probe: a short write alone is not taken for a full disk
    free = free_bytes(path)
    return free is not None and free < margin


def raise_if_disk_full(err: BaseException, path: str):
    """Raise :class:`DiskFullError` for ``path`` from ``err`` if a full disk caused it; else return.

    Call it in the ``except`` block before removing partial files (their space is the evidence).
    """
    try:
        err._yoda_path = str(path)
    except (AttributeError, TypeError):  # an exception type without instance attributes
        pass
    if is_disk_full(err):
        raise DiskFullError(path, f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}') \
            from err


def disk_full_error(err: BaseException, path: str):
    """The :class:`DiskFullError` for ``path`` if ``err`` came from a full disk there, else None.

    For an entry point's last word on a failure: besides the words :func:`is_disk_full` knows, an
    ``OSError`` / ``RuntimeError`` about a failed write raised while ``path``'s file system is (nearly)
    full counts (BasicSR's ``imwrite`` says only "Failed in writing images."); other errors never do.
    """
    if isinstance(err, DiskFullError):
        return err
    try:
        raise_if_disk_full(err, path)
    except DiskFullError as full:
        return full
    if isinstance(err, (OSError, RuntimeError)) and 'writ' in str(err).lower() and _nearly_full(path):
        return DiskFullError(path, f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}')
    return None


def exit_if_disk_full(err: BaseException, path: str, logger=None):
    """In an entry point's ``except``: on a full disk print one line (and log it), exit with code 2."""
    full = disk_full_error(err, path)
    if full is None:
        return
    import sys
    if logger is not None:
        logger.error(str(full))
    print(f'error: {full}', file=sys.stderr)
    raise SystemExit(DISK_FULL_EXIT_CODE)
