"""The settings of a training run that change its weights, recorded in its experiment folder.

A run records them in ``experiments/<name>/yoda_settings.json`` once BasicSR has made the folder. A resumed run
(``--auto_resume`` or ``path.resume_state``) whose settings differ is refused before anything is written, with
one line naming the differing keys; ``--force`` archives the folder instead (``<name>_archived_<time>``, as
BasicSR does for a new run of the same name) and starts afresh. A folder without a record (made before records
existed) is resumed unchecked and gets one.

The record holds the option file as written (``--force_yml`` applied), before BasicSR derives anything, minus
what does not change the trained weights: names, paths, logging, validation, the hardware (``num_gpu``, the
launcher), data-loading speed (workers, prefetching), ``train.total_iter`` (a resumed run may train longer) and
the fast paths ``train.compile`` / ``train.channels_last``.
"""
import os
import time

from yoda_plugin.utils.fingerprint import SettingsMismatch, archive, check_record, flatten, write_record

RECORD_FILE = 'yoda_settings.json'
IGNORED_TOP = {'name', 'path', 'logger', 'val', 'num_gpu', 'dist_params', 'find_unused_parameters',
               'use_static_graph', 'auto_resume', 'is_train', 'dist', 'rank', 'world_size', 'root_path',
               'yoda_plugin'}
IGNORED_TRAIN = {'total_iter', 'compile', 'channels_last'}
IGNORED_TRAIN_DATASET = {'name', 'phase', 'num_worker_per_gpu', 'prefetch_mode', 'pin_memory', 'persistent_workers'}
NEW_ROOT = 'give the new run another name (name: in the option file)'
FORCE = 'rerun with --force'

# The record to write once BasicSR has made the experiment folder (its copy_opt_file; see runner.patches).
_PENDING = {}


def training_settings(opt: dict) -> dict:
    """``{dotted key: value}`` of the options that change what a training run learns."""
    kept = {}
    for key, value in opt.items():
        if key in IGNORED_TOP:
            continue
        if key == 'train' and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in IGNORED_TRAIN}
        elif key == 'datasets' and isinstance(value, dict):
            train = value.get('train')
            value = {'train': {k: v for k, v in train.items() if k not in IGNORED_TRAIN_DATASET}
                     if isinstance(train, dict) else train}
        kept[key] = value
    return flatten(kept)


def check_experiment(opt: dict, file_opt: dict, force: bool = False, log=None):
    """Before a training run writes anything: compare ``file_opt`` (the option file as written) with the record of
    the experiment folder ``opt`` (BasicSR's parsed options) resumes into.

    Raises :class:`~yoda_plugin.utils.fingerprint.SettingsMismatch` on a difference; with ``force`` the folder is
    archived instead (rank 0), ``opt`` no longer resumes, and ``log(message)`` says so. Either way the record of
    this run is written once BasicSR has made the folder (:func:`write_pending_record`).
    """
    root = (opt.get('path') or {}).get('experiments_root')
    if not root or file_opt is None:
        return
    current = training_settings(file_opt)
    _PENDING.clear()
    _PENDING.update(root=root, settings=current, name=opt.get('name'))
    resuming = bool(opt.get('auto_resume') or (opt.get('path') or {}).get('resume_state'))
    if not resuming or not os.path.isdir(root):
        return  # a new run: BasicSR archives an existing folder of the same name itself
    try:
        check_record(os.path.join(root, RECORD_FILE), current, 'a training run', NEW_ROOT, FORCE)
    except SettingsMismatch as err:
        if not force:
            raise
        from basicsr.utils.dist_util import get_dist_info
        if get_dist_info()[0] == 0:
            moved = archive(root)
            if log is not None:
                log(f'--force: {root} was trained with other settings ({"; ".join(err.diffs[:6])}); archived to '
                    f'{moved}, training starts afresh')
        opt['auto_resume'] = False
        opt['path']['resume_state'] = None


def write_pending_record():
    """Write the record :func:`check_experiment` prepared into the experiment folder, if it exists (rank 0)."""
    if not _PENDING or not os.path.isdir(_PENDING['root']):
        return
    pending = dict(_PENDING)
    _PENDING.clear()
    write_record(os.path.join(pending['root'], RECORD_FILE), pending['settings'], name=pending['name'],
                 written_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
