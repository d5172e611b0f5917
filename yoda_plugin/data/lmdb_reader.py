"""Read-only LMDB access shared by the datasets of one process.

An LMDB environment may be opened only once per process (py-lmdb refuses a
second open), while a training run builds several datasets over the same
folders (train and val sharing an attention LMDB, tests building many). We
keep one read-only environment per folder and process; dataloader workers,
being other processes, open their own on first use.
"""
import os

import lmdb

_ENVS = {}


def open_lmdb(path: str):
    key = (os.getpid(), os.path.realpath(path))
    env = _ENVS.get(key)
    if env is None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f'LMDB folder {path} does not exist')
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        _ENVS[key] = env
    return env


def lmdb_get(path: str, key: str):
    """The bytes stored under ``key`` in the LMDB at ``path``, or None."""
    with open_lmdb(path).begin(write=False) as txn:
        return txn.get(key.encode('utf-8'))
