"""Declared option sections: a dataclass per section, one validation path for all of them.

A section (``yoda``, ``val.sampler``, ``val.sparse``, ...) is a dataclass whose
fields are the keys with their defaults and whose ``__post_init__`` checks
the values; :func:`build_section` turns an option dict into it, refusing
unknown keys with the closest known one.
"""
import difflib
import math
from dataclasses import fields
from typing import Optional, Type, TypeVar

T = TypeVar('T')


def unknown_key_message(where: str, unknown, known) -> str:
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, list(known), n=1)
        parts.append(f'{where}.{key}' + (f' (did you mean {where}.{close[0]}?)' if close else ''))
    return f'unknown option(s) {", ".join(parts)}; known: {", ".join(sorted(known))}'


def build_section(cls: Type[T], opt: Optional[dict], where: str) -> T:
    """``cls(**opt)`` for an option mapping; ``None`` gives the defaults. Unknown keys are errors."""
    if opt is None:
        return cls()
    if not isinstance(opt, dict):
        raise ValueError(f'{where} must be a mapping of options, got {type(opt).__name__} {opt!r}')
    known = {f.name for f in fields(cls)}
    unknown = set(opt) - known
    if unknown:
        raise ValueError(unknown_key_message(where, unknown, known))
    return cls(**dict(opt))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_bool(value, name: str):
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be true or false, got {value!r}')
