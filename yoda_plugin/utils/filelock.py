"""An exclusive, non-blocking, per-folder writer lock that works without ``fcntl``.

* POSIX (``fcntl``): ``flock`` on the lock file; the kernel frees it when the holder dies.
* Windows (``msvcrt``): ``msvcrt.locking`` on one byte of the lock file (far past the pid it holds, so the
  pid stays readable); also freed when the holder dies.
* Neither: the lock file is created with ``O_CREAT | O_EXCL`` (the holder removes it on release). A file
  left by a process that died is taken over when that pid is no longer running (POSIX), else the error
  says to delete it.

The lock file holds the holder's pid, which the refusal names. Two locks of one process on one file also
exclude each other.
"""
import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

_MSVCRT_LOCK_OFFSET = 4096  # the byte msvcrt locks; the pid is written at offset 0


class LockHeldError(RuntimeError):
    """Another writer holds the lock; ``holder`` is its pid as written in the lock file ('' if unknown)."""

    def __init__(self, path: str, holder: str = ''):
        self.path, self.holder = path, holder
        super().__init__(f'{path} is held{f" by pid {holder}" if holder else ""}')


def _read_pid(fd) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode('ascii', 'replace').strip()
    except OSError:
        return ''


def _write_pid(fd) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode('ascii'))


def _pid_running(pid: str) -> bool:
    if os.name != 'posix' or not pid.isdigit():
        return True  # cannot tell: assume it runs (never steal a lock we are unsure about)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class FileLock:
    """``FileLock(path).acquire()`` or raise :class:`LockHeldError`; ``release()`` frees it (idempotent)."""

    def __init__(self, path: str, mechanism: str = None):
        self.path = os.fspath(path)
        self.mechanism = mechanism or ('fcntl' if fcntl is not None else 'msvcrt' if msvcrt is not None
                                       else 'exclusive-create')
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> 'FileLock':
        if self._fd is not None:
            raise LockHeldError(self.path, str(os.getpid()))
        if self.mechanism == 'exclusive-create':
            self._fd = self._acquire_exclusive_create()
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.mechanism == 'fcntl':
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                os.lseek(fd, _MSVCRT_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:  # BlockingIOError (flock) or PermissionError (msvcrt): held by someone
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        _write_pid(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_create(self):
        for _ in range(2):  # a second try after removing a stale file
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(self.path, 'r', encoding='ascii', errors='replace') as f:
                        holder = f.read(64).strip()
                except OSError:
                    holder = ''
                if holder and not _pid_running(holder):
                    try:
                        os.remove(self.path)  # its holder died without releasing it
                    except FileNotFoundError:
                        pass
                    continue
                raise LockHeldError(self.path, holder) from None
            _write_pid(fd)
            return fd
        raise LockHeldError(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.mechanism == 'fcntl':
                fcntl.flock(fd, fcntl.LOCK_UN)
            elif self.mechanism == 'msvcrt':
                os.lseek(fd, _MSVCRT_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
            if self.mechanism == 'exclusive-create':
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
