"""Safe option-file parsing: the one YAML loader of the package's runners, scripts and API.

Our option files start with ``yoda_plugin: !!python/name:yoda_plugin.__version__``.
BasicSR's own runners load YAML with PyYAML's full (unsafe) ``Loader``, which
imports the named module: that is how an unmodified BasicSR registers our
classes. We never use that loader: :class:`SafeOptionLoader` is ``SafeLoader``
extended by exactly one constructor, which accepts ``python/name`` tags only
for attributes of the ``yoda_plugin`` package and refuses everything else
(saying which tag and why), and by a check that no key of a mapping is
repeated (PyYAML silently keeps the last one).

Only PyYAML is needed: the runners' checks of what the options mean are in
:mod:`yoda_plugin.runner.option_check`.
"""
import importlib
import os
from collections import OrderedDict

import yaml

PLUGIN_TAG_PREFIX = 'tag:yaml.org,2002:python/name:'
ALLOWED_MODULE = 'yoda_plugin'
_EXAMPLE = 'yoda_plugin: !!python/name:yoda_plugin.__version__'


class SafeOptionLoader(yaml.SafeLoader):
    """SafeLoader + OrderedDict mappings + ``!!python/name:yoda_plugin.*`` + no duplicate keys."""


def refuse_duplicate_keys(node):
    """Raise a YAML ``ConstructorError`` naming the key path and both lines of the first repeated key of any
    mapping under ``node`` (PyYAML silently keeps the last value)."""
    seen = set()

    def walk(n, path):
        if id(n) in seen:  # aliases
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    walk(value_node, path)
                    continue
                if key_node.tag == 'tag:yaml.org,2002:merge':
                    walk(value_node, path)
                    continue
                where = path + [key_node.value]
                ident = (key_node.tag, key_node.value)
                if ident in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f'duplicate key {".".join(where)} at lines {first[ident] + 1} and '
                        f'{key_node.start_mark.line + 1} (YAML would keep only the last one; remove one)',
                        key_node.start_mark)
                first[ident] = key_node.start_mark.line
                walk(value_node, where)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + [str(i)])

    walk(node, [])


def _construct_mapping(loader, node):
    if not getattr(loader, '_yoda_duplicates_checked', False):  # the first mapping is the root: check the file once
        loader._yoda_duplicates_checked = True
        refuse_duplicate_keys(node)
    return OrderedDict(loader.construct_pairs(node))


def _refused(suffix: str, why: str, node):
    return yaml.constructor.ConstructorError(
        None, None, f'refusing tag !!python/name:{suffix}: {why}; option files may name only attributes of the '
        f'{ALLOWED_MODULE} package, as in "{_EXAMPLE}" (safe loading: nothing else is imported)', node.start_mark)


def _construct_plugin_name(loader, suffix, node):
    module, _, attr = suffix.rpartition('.')
    if module != ALLOWED_MODULE and not module.startswith(ALLOWED_MODULE + '.'):
        raise _refused(suffix, f'{module or suffix} is not {ALLOWED_MODULE}', node)
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as err:  # e.g. yoda_plugin.os.system: nothing outside the package is tried
        if err.name and module.startswith(err.name):
            raise _refused(suffix, f'{module} is no module of {ALLOWED_MODULE}', node) from None
        raise _refused(suffix, f'{module} cannot be imported ({err})', node) from None
    except ImportError as err:
        raise _refused(suffix, f'{module} cannot be imported ({err})', node) from None
    if not hasattr(obj, attr):
        raise _refused(suffix, f'{module} has no attribute {attr!r}', node)
    return getattr(obj, attr)


SafeOptionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
SafeOptionLoader.add_multi_constructor(PLUGIN_TAG_PREFIX, _construct_plugin_name)


def load_options(path: str) -> dict:
    """Parse an option file safely; errors (ValueError, FileNotFoundError) name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'option file not found: {path}')
    with open(path, 'r', encoding='utf-8') as f:
        try:
            opt = yaml.load(f, Loader=SafeOptionLoader)
        except yaml.YAMLError as err:
            raise ValueError(f'cannot parse option file {path}: {err}') from err
        except UnicodeDecodeError as err:
            raise ValueError(f'cannot parse option file {path}: it is not UTF-8 text ({err.reason} at byte '
                             f'{err.start})') from None
    if not isinstance(opt, dict):
        raise ValueError(f'option file {path} must contain a mapping at top level, got {type(opt).__name__}')
    return opt
