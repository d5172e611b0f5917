"""Canonical JSON values: what attention sources record and attention LMDB metadata compare."""
import json

import numpy as np


def to_json(value):
    """Canonical JSON form: tuples become lists, numpy scalars plain numbers, keys sorted."""
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f'{type(obj).__name__} is not JSON serialisable')

    return json.loads(json.dumps(value, default=default, sort_keys=True))
