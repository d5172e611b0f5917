"""Precomputed attention maps in a BasicSR-layout LMDB.

Layout (as BasicSR's ``create_lmdb``)::

    name.lmdb/
    ├── data.mdb, lock.mdb      LMDB environment
    ├── meta_info.txt           "{key}.png ({h},{w},1) {compress_level}" per key, sorted by key
    ├── yoda_attention.json     {"format": "yoda-attention-v1", "encoding": "png16",
    │                            "source": <AttentionSource.config()>, ...extra fields}
    └── yoda_writer.lock        locked while a writer is open (utils/filelock.py)

Keys are the image keys (file name without extension, as BasicSR uses); a
value is the map ``A`` in [0, 1] encoded as a 16-bit grayscale PNG of
``round(A * 65535)`` (max round-trip error 0.5 / 65535). Keys must be
non-empty, contain no whitespace (meta_info.txt is space separated) and fit
LMDB's key size; BasicSR's own LMDB client only finds ASCII keys.

Only the ``lmdb`` package is used, not basicsr.
"""
import json
import os
import tempfile
import weakref
from typing import Iterable, List, Sequence, Tuple

import cv2
import lmdb
import numpy as np

from ..utils.disk import DiskFullError, raise_if_disk_full
from ..utils.filelock import FileLock, LockHeldError
from ..utils.jsonable import to_json

FORMAT = 'yoda-attention-v1'
ENCODING = 'png16'
META_FILE = 'yoda_attention.json'
META_INFO_FILE = 'meta_info.txt'
LOCK_FILE = 'yoda_writer.lock'
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_MAX_KEY_BYTES = 511  # LMDB's default maximum key size


class AttentionLMDBLockedError(RuntimeError):
    """Another writer holds the attention LMDB folder."""


class MissingAttentionKeyError(ValueError, KeyError):
    """A key is not in the attention LMDB (catchable as ValueError or KeyError)."""

    __str__ = BaseException.__str__


# --------------------------------------------------------------------------- helpers

def _canonical(value):
    """JSON round trip (see :func:`yoda_plugin.utils.jsonable.to_json`); ValueError if not JSON-able."""
    try:
        return to_json(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f'attention metadata must be JSON serialisable: {err}') from err


def _atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync and os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; these files are meant to be shared like data.mdb
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _fmt(value) -> str:
    return '<missing>' if value is _MISSING else json.dumps(value, sort_keys=True)


_MISSING = object()


def _diff(expected, found, prefix: str = '', strict: bool = True) -> List[str]:
    """Human-readable differences between two JSON values, by dotted field name.

    Dicts are compared key by key (recursively). With ``strict=False`` keys that
    are only in ``found`` are ignored at every level: ``expected`` lists just
    the fields that must match (an option file's ``attention_meta``).
    """
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        keys = set(expected) | (set(found) if strict else set())
        for k in sorted(keys, key=str):
            name = f'{prefix}.{k}' if prefix else str(k)
            out += _diff(expected.get(k, _MISSING), found.get(k, _MISSING), name, strict)
        return out
    same = expected is not _MISSING and found is not _MISSING and \
        isinstance(expected, bool) == isinstance(found, bool) and expected == found
    return [] if same else [f'{prefix or "<root>"}: expected {_fmt(expected)}, found {_fmt(found)}']


def validate_key(key) -> bytes:
    """Return ``key`` encoded (UTF-8); ValueError for empty keys, whitespace or over-long keys."""
    if not isinstance(key, str) or not key:
        raise ValueError(f'attention LMDB keys must be non-empty strings, got {key!r}')
    if any(ch.isspace() for ch in key):
        raise ValueError(f'attention LMDB key {key!r} contains whitespace, which meta_info.txt cannot represent')
    raw = key.encode('utf-8')
    if len(raw) > _MAX_KEY_BYTES:
        raise ValueError(f'attention LMDB key {key[:40]!r}... is longer than {_MAX_KEY_BYTES} bytes')
    return raw


def validate_map(amap, key: str = '?') -> np.ndarray:
    """Return ``amap`` as float64 (H, W); ValueError naming ``key`` unless 2-D, non-empty, finite, in [0, 1]."""
    try:
        arr = np.asarray(amap)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f'attention map for key {key!r} is not an array: {err}') from err
    if arr.ndim != 2:
        raise ValueError(f'attention map for key {key!r} must be 2-D (H, W), got shape {tuple(arr.shape)}')
    if arr.size == 0:
        raise ValueError(f'attention map for key {key!r} is empty: shape {tuple(arr.shape)}')
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f'attention map for key {key!r} must be a real-valued array in [0, 1], got dtype {arr.dtype}')
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f'attention map for key {key!r} contains NaN or Inf values')
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f'attention map for key {key!r} must lie in [0, 1], got min {lo:.6g} and max {hi:.6g}')
    return arr


def encode_attention(amap, key: str = '?', compress_level: int = 1) -> bytes:
    """Validate and encode a map as 16-bit grayscale PNG bytes of ``round(A * 65535)``."""
    arr = validate_map(amap, key)
    u16 = np.round(arr * 65535.0).astype(np.uint16)
    ok, buf = cv2.imencode('.png', u16, [cv2.IMWRITE_PNG_COMPRESSION, int(compress_level)])
    if not ok:
        raise ValueError(f'cannot PNG-encode the attention map for key {key!r} (shape {arr.shape})')
    return buf.tobytes()


def decode_attention(value: bytes, key: str = '?') -> np.ndarray:
    """Decode a stored value into a float32 (H, W) map in [0, 1].

    16-bit PNGs are divided by 65535 (8-bit grayscale PNGs, by 255). Raises
    ValueError naming ``key`` for undecodable bytes or a non-single-channel image.
    """
    if value is None:
        raise ValueError(f'no attention value for key {key!r}')
    try:
        buf = np.frombuffer(value, dtype=np.uint8)
    except (TypeError, ValueError) as err:
        raise ValueError(f'attention value for key {key!r} is not bytes: {err}') from err
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            img = None
    if img is None:
        raise ValueError(f'cannot decode the attention map for key {key!r}: not a valid PNG image')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim != 2:
        raise ValueError(f'attention map for key {key!r} must be a single-channel image, '
                         f'got shape {tuple(img.shape)}')
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / np.float32(65535.0))
    if img.dtype == np.uint8:
        return (img.astype(np.float32) / np.float32(255.0))
    raise ValueError(f'attention map for key {key!r} has unsupported PNG dtype {img.dtype}')


def _png_size(value: bytes) -> Tuple[int, int]:
    """(h, w) from a PNG's IHDR chunk, without decoding the pixels."""
    head = bytes(value[:24])
    if len(head) == 24 and head[:8] == _PNG_SIGNATURE and head[12:16] == b'IHDR':
        return int.from_bytes(head[20:24], 'big'), int.from_bytes(head[16:20], 'big')
    return decode_attention(value).shape  # raises ValueError for anything undecodable


def make_attention_meta(source, **extra) -> dict:
    """Metadata for a writer: ``{'source': <config>, **extra}``.

    ``source`` is an AttentionSource (its ``config()`` is used) or a config dict.
    """
    config = source.config() if hasattr(source, 'config') else source
    if not isinstance(config, dict) or 'name' not in config:
        raise ValueError(f'source must be an AttentionSource or its config dict, got {source!r}')
    return _canonical({'source': config, **extra})


def _full_meta(meta: dict) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f'meta must be a dict, got {type(meta).__name__}')
    if not isinstance(meta.get('source'), dict):
        raise ValueError('meta must contain "source": the config dict of the attention source')
    for field, value in (('format', FORMAT), ('encoding', ENCODING)):
        if field in meta and meta[field] != value:
            raise ValueError(f'meta field {field!r} must be {value!r}, got {meta[field]!r}')
    return _canonical({**meta, 'format': FORMAT, 'encoding': ENCODING})


def read_attention_meta(path: str) -> dict:
    """The metadata dict of an attention LMDB; ValueError naming ``path`` if missing or not our format."""
    file = os.path.join(path, META_FILE)
    if not os.path.isfile(file):
        raise ValueError(f'{path} is not an attention LMDB written by yoda_plugin: {META_FILE} is missing')
    try:
        with open(file, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f'cannot read the attention metadata {file}: {err}') from err
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        found = meta.get('format') if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f'{file} is not in the {FORMAT!r} format (found format {found!r})')
    if meta.get('encoding') != ENCODING:
        raise ValueError(f'{file}: unsupported attention encoding {meta.get("encoding")!r} (expected {ENCODING!r})')
    return meta


def check_attention_meta(path: str, expected: dict) -> dict:
    """Check the metadata of the attention LMDB at ``path`` against ``expected``; return it.

    Every field of ``expected``, at any depth, must match; fields only in the
    file are not checked. ``{'source': {'name': 'edge'}}`` accepts any edge map,
    ``{'source': {'name': 'edge', 'close_kernel': 0.05}}`` only those made with
    that kernel.
    Raises ValueError listing every mismatched field as "field: expected X,
    found Y".
    """
    found = read_attention_meta(path)
    diffs = _diff(_canonical(dict(expected)), found, strict=False)
    if diffs:
        raise ValueError(f'attention LMDB {path} was made with another configuration:\n  ' + '\n  '.join(diffs))
    return found


def meta_info_file(path: str) -> str:
    """``path`` itself, or the ``meta_info.txt`` of the LMDB folder ``path``."""
    return os.path.join(path, META_INFO_FILE) if os.path.isdir(path) else path


def _meta_info_lines(file: str):
    """(line number, whitespace-separated fields) of every non-empty line of a BasicSR meta info file."""
    with open(file, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.split()


def _meta_info_key(name: str) -> str:
    return os.path.splitext(name)[0] or name  # a.b.png -> a.b


def read_meta_info_keys(path: str) -> List[str]:
    """The keys a BasicSR meta info file lists (the first field of each line, without its extension), in order;
    ``path`` is the file or an LMDB folder. The other fields are not read (files of other tools vary there)."""
    return [_meta_info_key(fields[0]) for _, fields in _meta_info_lines(meta_info_file(path))]


def read_meta_info(path: str) -> List[Tuple[str, Tuple[int, ...], str]]:
    """Parse a BasicSR ``meta_info.txt`` (``path``: the LMDB folder, or the file) into (key, shape, compress_level).

    The key is the file name before its last extension (``a.b.png`` -> ``a.b``). The one reader of these
    files: precompute, data preparation and the datasets use it.
    """
    file = meta_info_file(path)
    rows = []
    for lineno, fields in _meta_info_lines(file):
        shape: Tuple[int, ...] = ()
        if len(fields) > 1:
            try:
                shape = tuple(int(v) for v in fields[1].strip('()').split(',') if v)
            except ValueError:
                raise ValueError(f'{file}:{lineno}: cannot parse the shape in {" ".join(fields)!r}') from None
        rows.append((_meta_info_key(fields[0]), shape, fields[2] if len(fields) > 2 else ''))
    return rows


def read_attention_lmdb(path: str, key: str) -> np.ndarray:
    """Read and decode one map (for tests and scripts; datasets keep an env open).

    Opens and closes the LMDB on every call. py-lmdb allows one open environment
    per folder and process, so while an :class:`AttentionLMDBWriter` of this
    process has ``path`` open, the map is read through the writer instead.
    """
    if not os.path.isfile(os.path.join(path, 'data.mdb')):
        raise ValueError(f'{path} is not an LMDB folder (no data.mdb)')
    raw = validate_key(key)
    writer = _OPEN_WRITERS.get(os.path.realpath(path))
    if writer is not None and not writer.closed:
        value = writer.get_encoded(raw)
    else:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        try:
            with env.begin(write=False) as txn:
                value = txn.get(raw)
                value = None if value is None else bytes(value)
        finally:
            env.close()
    if value is None:
        raise MissingAttentionKeyError(f'key {key!r} not found in attention LMDB {path}')
    return decode_attention(value, key)


# --------------------------------------------------------------------------- writer

MAX_GROWTH_RETRIES = 64


def commit_pairs(env, pairs: Sequence[Tuple[bytes, bytes]], overwrite: bool = True, path: str = '') -> int:
    """Put ``(key, value)`` byte pairs into the LMDB environment ``env`` in **one** write transaction.

    The one place this package writes an LMDB transaction. When the map is full (``lmdb.MapFullError``) the
    transaction has been aborted, so nothing of it is visible: the map grows to
    ``max(2 * size, size + 4 * bytes of the values)`` and the whole transaction is retried (at most
    :data:`MAX_GROWTH_RETRIES` times, then RuntimeError naming ``path``). With ``overwrite=False`` keys
    already present are kept. Returns how many keys were new. No other transaction of this process may be
    open on ``env`` (LMDB's rule for growing a map). A full disk (py-lmdb's ``lmdb.DiskError`` / ``lmdb.Error``
    "No space left on device" or, on a full tmpfs, "mdb_txn_commit: Input/output error") raises
    :class:`~yoda_plugin.utils.disk.DiskFullError` naming ``path``; the failed transaction is aborted, so every
    earlier commit stays intact and a rerun with space resumes.
    """
    pairs = list(pairs)  # retried as a whole
    need = sum(len(value) for _, value in pairs)
    for _ in range(MAX_GROWTH_RETRIES):
        try:
            added = 0
            with env.begin(write=True) as txn:
                for key, value in pairs:
                    added += bool(txn.put(key, value, overwrite=overwrite))
            return added
        except lmdb.MapFullError:
            size = int(env.info()['map_size'])
            env.set_mapsize(max(2 * size, size + 4 * need))
        except (lmdb.Error, OSError) as err:
            raise_if_disk_full(err, path or env.path())  # probed now, before anything is cleaned up
            raise
    where = path or env.path()
    raise RuntimeError(f'cannot fit {len(pairs)} value(s) of {need} bytes into {where} after growing the map')


_OPEN_WRITERS = weakref.WeakValueDictionary()  # realpath -> open writer of this process

class AttentionLMDBWriter:
    """Write attention maps into ``path`` (a BasicSR-layout LMDB folder), resumably.

    * ``meta`` is ``{'source': <AttentionSource.config()>, **extra}`` (see
      :func:`make_attention_meta`); ``format`` and ``encoding`` are added. A new
      folder gets ``yoda_attention.json`` (atomic write) before any map; an
      existing one must carry exactly the same metadata, else ValueError listing
      the differing fields. A folder with an LMDB but no metadata is refused.
    * Only one writer per folder: an exclusive non-blocking lock
      (:class:`~yoda_plugin.utils.filelock.FileLock`: ``flock``, else ``msvcrt``, else an exclusive-create
      file) on ``path/yoda_writer.lock`` (also between two writers of one process).
    * ``put`` commits each map in its own transaction, ``put_many_encoded``
      a chunk of encoded maps in one, so readers never see a torn value and an
      interrupted run keeps every map committed so far; ``key in writer`` lets
      a resumed run skip them. A full map grows and the transaction is retried
      (:func:`commit_pairs`).
    * ``close`` (also on ``with`` exit, even after an error) rewrites
      ``meta_info.txt`` from all keys in the DB, sorted, atomically. Its
      compress level column is this writer's ``compress_level`` (BasicSR does
      not read it).
    """

    def __init__(self, path: str, meta: dict, map_size: int = 64 * 1024 ** 2, compress_level: int = 1):
        self.path = os.fspath(path)
        self.meta = _full_meta(meta)
        if isinstance(compress_level, bool) or not isinstance(compress_level, (int, np.integer)) or \
                not 0 <= int(compress_level) <= 9:
            raise ValueError(f'compress_level must be an integer in 0..9, got {compress_level!r}')
        self.compress_level = int(compress_level)
        if isinstance(map_size, bool) or not isinstance(map_size, (int, np.integer)) or int(map_size) < 1:
            raise ValueError(f'map_size must be a positive integer (bytes), got {map_size!r}')
        self.env = None
        self._lock = None
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f'{self.path} exists and is not a folder')
        if os.path.exists(os.path.join(self.path, 'data.mdb')) and \
                not os.path.exists(os.path.join(self.path, META_FILE)):
            raise ValueError(f'{self.path} already holds an LMDB without {META_FILE}; refusing to write attention '
                             'maps into an LMDB of unknown content')  # checked again under the lock
        os.makedirs(self.path, exist_ok=True)
        self._acquire_lock()
        try:
            self._check_or_write_meta()
            self.env = lmdb.open(self.path, map_size=int(map_size), subdir=True, readahead=False, meminit=False,
                                 max_dbs=0)
            self.map_size = int(self.env.info()['map_size'])
            _OPEN_WRITERS[os.path.realpath(self.path)] = self
        except BaseException:
            self._release()
            raise

    # -- setup
    def _acquire_lock(self) -> None:
        lock = FileLock(os.path.join(self.path, LOCK_FILE))
        try:
            lock.acquire()
        except LockHeldError as err:
            who = f' (pid {err.holder})' if err.holder else ''
            raise AttentionLMDBLockedError(
                f'another process is writing {self.path}{who}: it holds the lock {LOCK_FILE}; '
                'wait for it to finish or stop it before writing to this folder') from None
        self._lock = lock

    def _check_or_write_meta(self) -> None:
        meta_file = os.path.join(self.path, META_FILE)
        if os.path.exists(meta_file):
            found = read_attention_meta(self.path)
            diffs = _diff(self.meta, found, strict=True)
            if diffs:
                raise ValueError(f'cannot resume into {self.path}: its maps were made with another configuration '
                                 '(write to a new folder or delete this one):\n  ' + '\n  '.join(diffs))
        elif os.path.exists(os.path.join(self.path, 'data.mdb')):
            raise ValueError(f'{self.path} already holds an LMDB without {META_FILE}; refusing to write attention '
                             'maps into an LMDB of unknown content')
        else:
            _atomic_write_text(meta_file, json.dumps(self.meta, indent=2, sort_keys=True) + '\n')

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def closed(self) -> bool:
        return self.env is None

    def _require_open(self):
        if self.env is None:
            raise RuntimeError(f'attention LMDB writer for {self.path} is closed')
        return self.env

    # -- access
    def __contains__(self, key) -> bool:
        env = self._require_open()
        try:
            raw = validate_key(key)
        except ValueError:
            return False
        with env.begin(write=False) as txn:
            return txn.get(raw) is not None

    def __len__(self) -> int:
        return int(self._require_open().stat()['entries'])

    def keys(self) -> List[str]:
        """All keys in the DB, sorted."""
        env = self._require_open()
        with env.begin(write=False) as txn:
            return [bytes(k).decode('utf-8') for k in txn.cursor().iternext(keys=True, values=False)]

    def get_encoded(self, raw_key: bytes):
        """The stored bytes under ``raw_key`` (encoded key), or None."""
        with self._require_open().begin(write=False) as txn:
            value = txn.get(raw_key)
            return None if value is None else bytes(value)

    def put(self, key: str, amap) -> None:
        """Validate, encode and commit one map (ValueError naming ``key`` for an invalid map)."""
        self._require_open()
        raw = validate_key(key)
        value = encode_attention(amap, key, self.compress_level)
        self.put_encoded(raw, value)

    def put_encoded(self, raw_key: bytes, value: bytes) -> None:
        """Commit already encoded bytes under ``raw_key`` in one transaction, growing the map when full."""
        self.put_many_encoded([(raw_key, value)])

    def put_many_encoded(self, pairs: Sequence[Tuple[bytes, bytes]], overwrite: bool = True) -> int:
        """Commit encoded ``(raw_key, value)`` pairs in **one** transaction (:func:`commit_pairs`).

        Committing (and fsyncing) costs milliseconds per transaction on most disks, more than computing a
        deterministic map, so bulk writers (scripts/precompute_attention.py, shard merging) commit chunks of
        maps; readers still never see a torn value and an interrupted run keeps every committed chunk. With
        ``overwrite=False`` keys already present are kept. Returns how many keys were new; ``map_size``
        follows the map's growth.
        """
        env = self._require_open()
        try:
            return commit_pairs(env, pairs, overwrite=overwrite, path=self.path)
        finally:
            self.map_size = int(env.info()['map_size'])

    # -- finish
    def _meta_info_lines(self) -> Iterable[str]:
        env = self._require_open()
        rows = []
        with env.begin(write=False) as txn:
            for k, v in txn.cursor():
                key = bytes(k).decode('utf-8')
                h, w = _png_size(v)
                rows.append((key, h, w))
        rows.sort()
        return [f'{key}.png ({h},{w},1) {self.compress_level}\n' for key, h, w in rows]

    def write_meta_info(self) -> None:
        """Rewrite meta_info.txt from the DB (atomic replace)."""
        _atomic_write_text(os.path.join(self.path, META_INFO_FILE), ''.join(self._meta_info_lines()))

    def close(self) -> None:
        if self.env is None:
            self._release()
            return
        try:
            try:
                self.write_meta_info()
                self.env.sync(True)
            except (lmdb.Error, OSError) as err:
                if not isinstance(err, DiskFullError):
                    raise_if_disk_full(err, self.path)
                raise
        finally:
            self._release()

    def _release(self) -> None:
        if _OPEN_WRITERS.get(os.path.realpath(self.path)) is self:
            del _OPEN_WRITERS[os.path.realpath(self.path)]
        if self.env is not None:
            try:
                self.env.close()
            finally:
                self.env = None
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = 'closed' if self.closed else 'open'
        return f'AttentionLMDBWriter({self.path!r}, {state})'
