"""Generic torch file I/O: atomic saves, safe loads with clear errors, finiteness checks.

The bottom of the package: it needs torch and :mod:`yoda_plugin.utils.disk`, nothing of BasicSR or of the models
(the BasicSR checkpoint layout and the model methods are in :mod:`yoda_plugin.models.checkpoint`).
"""
import os
import pickle
import re

import torch

from .disk import raise_if_disk_full

# Temporary files of atomic_torch_save are named <final name>.tmp.<pid>.
TMP_INFIX = '.tmp.'

# Every way to allow unsafe unpickling; a caller with its own switch names it instead (UnsafeCheckpointError.hint).
TRUST_SWITCH = ('"path: {trust_checkpoint: true}" in the option file (YODAResolver: trust_checkpoint=True; '
                'scripts/inference_yoda.py: --trust-checkpoint)')


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint.

    A full disk raises :class:`~yoda_plugin.utils.disk.DiskFullError` naming ``path`` (torch's own words are
    "enforce fail ... unexpected pos"); the previous file of that name, if any, is left as it was.
    """
    tmp = f'{path}{TMP_INFIX}{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (RuntimeError, OSError) as err:
        raise_if_disk_full(err, path)  # before the partial file is removed: its space is the evidence
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporary_files(folder: str) -> list:
    """Remove the ``*.tmp.<pid>`` files in ``folder`` that no running process of this machine is writing.

    They are left behind when a run is killed mid-save (the final files are never torn). Returns the removed
    paths. A file whose writer is alive, or whose pid cannot be checked, is kept.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        stem, sep, pid = name.rpartition(TMP_INFIX)
        if not sep or not stem or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # another user's process, or no way to tell: keep its file
    return True


def non_finite_tensors(state: dict) -> list:
    """Keys of the floating-point tensors in ``state`` that hold a NaN or Inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


_TORCH_BOILERPLATE = ('Weights only load failed', 'Check the documentation', 'Please file an issue', '(1)', '(2)')


def _short(err) -> str:
    """The line of torch's long weights-only message that says what was wrong (no colour codes)."""
    lines = [ln.strip() for ln in re.sub(r'\x1b\[[0-9;]*m', '', str(err)).splitlines()]
    lines = [ln.split('WeightsUnpickler error:')[-1].strip() for ln in lines
             if ln and not ln.startswith(_TORCH_BOILERPLATE)]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else str(err)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that only full unpickling (``weights_only=False``) can load. ``str()`` names
    :data:`TRUST_SWITCH`; :meth:`with_hint` words it for a caller with its own switch."""

    def __init__(self, path: str, detail: str, blocked: bool, hint: str = TRUST_SWITCH):
        self.path, self.detail, self.blocked, self.hint = path, detail, blocked, hint
        super().__init__(self._message())

    def _message(self) -> str:
        return (f'{self.path} needs unsafe unpickling (it stores Python objects beyond tensors and plain '
                f'containers), so it was refused under torch.load(weights_only=True). '
                + ('It calls a function of os/sys: that is what a malicious file does; do not trust it unless '
                   'you made it. ' if self.blocked else '')
                + f'Only if you trust its origin, set {self.hint} to load it with weights_only=False. '
                f'({self.detail})')

    def with_hint(self, hint: str) -> 'UnsafeCheckpointError':
        return UnsafeCheckpointError(self.path, self.detail, self.blocked, hint)


# Errors of torch's unpickler reading bytes that are no pickle at all: their words say nothing to a user.
_OPCODE_ERRORS = (IndexError, KeyError, TypeError, AttributeError, EOFError, pickle.UnpicklingError)


def _not_a_checkpoint(path: str, why) -> ValueError:
    with open(path, 'rb') as f:
        head = f.read(16)
    kind, detail = '', True
    if head and not head.startswith((b'PK', b'\x80')):  # torch.save writes a zip; old torch a pickle (protocol 2+)
        try:
            head.decode('utf-8')
            kind, detail = f', it looks like a text file (starts with {head[:12]!r})', False
        except UnicodeDecodeError:
            kind = f', it starts with {head[:8]!r}'
    elif not head:
        kind, detail = ', it is empty', False
    if detail and isinstance(why, _OPCODE_ERRORS):
        detail = False  # e.g. "IndexError: pop from empty list": the unpickler's state, not the file's problem
    reason = f': {type(why).__name__}: {_short(why)}' if detail and _short(why) else ''
    return ValueError(f'{path} is not a PyTorch checkpoint (truncated, renamed or another format?){kind}{reason}')


def load_checkpoint(path: str, weights_only: bool = True):
    """``torch.load`` on the CPU with errors that name the file and what to do.

    A file that needs unsafe unpickling raises :class:`UnsafeCheckpointError` (a ValueError); a file that is no
    checkpoint at all (text, empty, truncated) a ValueError naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # torch words a refused global "Unsupported global: GLOBAL m.x ..." or, for a blocked module (os, sys),
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        lines = [ln for ln in str(err).splitlines() if 'unsupported global' in ln.lower()]
        if weights_only and lines:
            detail = _short(lines[0])
            raise UnsafeCheckpointError(path, detail, 'is blocked' in detail) from err
        raise _not_a_checkpoint(path, err) from err
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as err:
        # A text file renamed .pth reaches the weights-only unpickler as opcodes: IndexError 'pop from empty
        # list', KeyError 101 (a memo index) ... none of which names the file.
        raise _not_a_checkpoint(path, err) from err
