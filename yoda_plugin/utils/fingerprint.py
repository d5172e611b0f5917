"""One rule for every job that writes into a folder and can be resumed: it records the settings that change its
result, and a rerun with other settings is refused (or, asked to, archives the folder and starts afresh).

* :func:`flatten` turns nested settings into ``{dotted key: JSON value}``;
* :func:`differences` lists the keys whose values differ, as ``key: recorded -> now``;
* :func:`read_record` / :func:`write_record` keep ``{'format', 'settings'}`` in a JSON file (atomic write);
* :class:`SettingsMismatch` is the refusal: one line naming the folder, the differing keys, and the two
  choices (another output folder, or ``force`` to archive this one);
* :func:`archive` renames a folder to ``<folder>_archived_<time>`` (BasicSR's name for an archived experiment).

Generic: nothing here knows a job. Used by the training runner, precompute and prepare_data.
"""
import json
import math
import os
import time
from typing import Dict, List, Optional

RECORD_FORMAT = 'yoda-settings-v1'
MAX_NAMED = 6  # differing keys named in a refusal (the count says how many more)


def _plain(value):
    """JSON-compatible and canonical: mappings with string keys, tuples as lists, non-finite floats as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def flatten(settings, prefix: str = '') -> Dict[str, object]:
    """``{'a': {'b': 1}, 'c': [1, 2]}`` -> ``{'a.b': 1, 'c': [1, 2]}`` (lists are values); an empty mapping is
    kept as a value, so that it differs from an absent key."""
    if isinstance(settings, dict) and (settings or not prefix):
        out = {}
        for key, value in settings.items():
            out.update(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
        return out
    return {prefix: _plain(settings)}


def _text(value, missing: bool) -> str:
    return '(absent)' if missing else json.dumps(value, sort_keys=True)


def differences(recorded: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """``['key: recorded -> now', ...]`` for every dotted key whose value differs, sorted by key."""
    recorded, current = _plain(recorded), _plain(current)
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key in recorded and key in current and recorded[key] == current[key] \
                and isinstance(recorded[key], bool) == isinstance(current[key], bool):
            continue
        out.append(f'{key}: {_text(recorded.get(key), key not in recorded)} -> '
                   f'{_text(current.get(key), key not in current)}')
    return out


def read_record(path: str) -> Optional[Dict[str, object]]:
    """The settings recorded in ``path``; None when there is no record. A record that cannot be read is a
    ValueError naming the file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f'{path} cannot be read ({err}); it records the settings of what was written next to it: '
                         f'restore it, or archive the folder') from None
    if not isinstance(record, dict) or record.get('format') != RECORD_FORMAT or \
            not isinstance(record.get('settings'), dict):
        raise ValueError(f'{path} is not a settings record ({RECORD_FORMAT}); restore it, or archive the folder')
    return record['settings']


def write_record(path: str, settings: Dict[str, object], **extra) -> None:
    """Write ``settings`` (flat) into ``path`` atomically, with ``extra`` fields for people reading it."""
    record = {'format': RECORD_FORMAT, 'settings': _plain(settings), **_plain(extra)}
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(json.dumps(record, indent=2, sort_keys=True) + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SettingsMismatch(ValueError):
    """A rerun whose settings differ from those recorded in ``folder``; ``keys`` are the differing keys."""

    def __init__(self, what: str, folder: str, diffs: List[str], new_root: str, force: str):
        self.folder, self.diffs = folder, list(diffs)
        self.keys = [d.split(':', 1)[0] for d in diffs]
        shown = '; '.join(diffs[:MAX_NAMED]) + (f'; and {len(diffs) - MAX_NAMED} more' if len(diffs) > MAX_NAMED
                                                 else '')
        super().__init__(f'{folder} holds {what} made with other settings ({shown}); nothing was changed: '
                         f'{new_root}, or {force} to archive it and start afresh')


def check_record(path: str, current: Dict[str, object], what: str, new_root: str, force: str) -> bool:
    """Compare ``current`` with the record in ``path``: True when they match, False when there is no record;
    :class:`SettingsMismatch` (the folder is the record's) when they differ."""
    recorded = read_record(path)
    if recorded is None:
        return False
    diffs = differences(recorded, current)
    if diffs:
        raise SettingsMismatch(what, os.path.dirname(os.path.abspath(path)), diffs, new_root, force)
    return True


def archive(folder: str) -> str:
    """Rename ``folder`` to ``<folder>_archived_<YYYYmmdd_HHMMSS>`` (a counter added if taken); the new path."""
    folder = os.path.normpath(folder)
    base = f'{folder}_archived_{time.strftime("%Y%m%d_%H%M%S")}'
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f'{base}_{n}'
    os.rename(folder, target)
    return target
