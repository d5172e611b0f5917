"""The whole option tree checked against what BasicSR and the plugin read, before anything is made.

Our runners (``yoda_plugin/train.py``, ``yoda_plugin/test.py``) call BasicSR's
``train_pipeline`` / ``test_pipeline``, whose ``parse_options`` reads the file,
applies ``--force_yml`` and adds its derived keys (``is_train``, ``dist``,
``rank``, the ``path`` folders). :mod:`yoda_plugin.runner.patches` wraps that
``parse_options`` in ``basicsr.train`` and ``basicsr.test``:

1. before it (:func:`check_command_line`): the file parses safely, with a
   mapping at top level and no duplicate key; every ``--force_yml`` entry is
   ``KEY:SUBKEY=VALUE`` with one ``=``, names existing sections and sets no
   mapping; the keys ``parse_options`` itself reads (``name``, ``num_gpu``,
   ``manual_seed``, ``datasets``, ``path``, ``logger`` for training) are there
   with usable types;
2. after it (:func:`check_option_tree`), on the tree the run will use: every
   key of the top level, ``path``, ``train``, ``logger``, ``val`` (BasicSR's
   models), ``val.metrics.*``, ``datasets.*`` (dataset classes that declare
   their keys in ``*_DATASET_KEYS`` module sets) and ``attention_meta`` is a
   known one (else: the closest known key); the keyword sections are checked
   against the signature of what they build: ``network_*`` (the architecture
   class), ``train.optim_*`` (the torch optimizer), ``train.scheduler``,
   ``train.*_opt`` (the loss class) and ``val.metrics.*`` (the metric
   function): an unknown keyword gets the closest accepted one, a required one
   that is missing is named; the keys BasicSR's pipelines index
   without a default are present (``train.total_iter``,
   ``logger.save_checkpoint_freq``, ...) with the expected type; registered
   ``model_type`` / ``network_*.type`` / dataset, loss and metric types; ``num_gpu``
   fits the visible CUDA devices; for our diffusion models every section they
   read (``diffusion``, ``yoda``, ``val``, ``srdiff``, ``train.nan_policy``,
   ...) through the model class's own option parsing, the sampler of ``val``
   on the training schedule, and with YODA on every dataset section can return
   attention maps.

A problem stops the runner with one line on stderr naming the option file and
the key, and exit code 2 (a usage error), before any folder is made, any
network built or any file read besides the option file. Nothing is written.
"""
import ast
import copy
import difflib
import inspect
import math


# -- what BasicSR reads (basicsr 1.4.2: utils/options.py, train.py, test.py, models/*, utils/logger.py) --------------
BASICSR_TOP_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val', 'logger',
    'dist_params', 'find_unused_parameters', 'use_static_graph', 'is_train', 'dist', 'rank', 'world_size',
    'auto_resume', 'root_path'
}
PLUGIN_TOP_KEYS = {'yoda_plugin', 'diffusion', 'yoda'}
NETWORK_PREFIX = 'network_'
PATH_KEYS = {'resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states', 'log',
             'visualization', 'results_root'}
PATH_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
# Every train key a BasicSR model reads (SRModel, SRGAN/ESRGAN, EDVR, StyleGAN2, video models), besides optim_*
# and *_opt (losses); the plugin's models add theirs with ``extra_option_keys``.
TRAIN_KEYS = {'ema_decay', 'total_iter', 'warmup_iter', 'scheduler', 'net_d_iters', 'net_d_init_iters',
              'fix_flow', 'tsa_iter', 'dcn_lr_mul', 'flow_lr_mul', 'lr_flow', 'path_batch_shrink', 'mixing_prob',
              'net_d_reg_every', 'net_g_reg_every', 'path_reg_weight', 'r1_reg_weight'}
TRAIN_PREFIXES, TRAIN_SUFFIXES = ('optim_',), ('_opt',)
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}
WANDB_KEYS = {'project', 'resume_id'}
BASICSR_VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'pbar'}  # models other than ours
METRIC_KEYS = {'type', 'better'}  # besides the metric function's parameters
SCHEDULER_TYPES = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')
ATTENTION_META_KEYS = {'source', 'grid', 'size', 'scale', 'resize', 'format', 'encoding'}
# Dataset types that return ``attention`` maps (a registered class may also say so with ``provides_attention``).
ATTENTION_DATASETS = {'YODAPairedDataset'}
USAGE_EXIT_CODE = 2


class OptionError(ValueError):
    """An option file (or ``--force_yml`` entry) that the runners refuse; the message names the key."""


# -- small helpers -----------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_whole(v) -> bool:
    """An integer, or a float with an integral value (``!!float 1e4``, which BasicSR's counters accept)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _closest(key, known):
    same = [k for k in sorted(known, key=str) if str(k).lower() == str(key).lower()]  # Adamw -> AdamW, not Adam
    if same:
        return same[0]
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    return close[0] if close else None


def _unknown(where: str, key, known) -> str:
    path = f'{where}.{key}' if where else str(key)
    close = _closest(key, known)
    hint = f' (did you mean {where + "." if where else ""}{close}?)' if close else ''
    return f'unknown key {path}{hint}'


def _registered(registry) -> set:
    obj_map = getattr(registry, '_obj_map', None)
    return set(obj_map) if isinstance(obj_map, dict) else set(registry.keys())


def _registry_get(registry, name):
    try:
        return registry.get(name) if isinstance(name, str) and name in registry else None
    except KeyError:
        return None


def _unregistered(where: str, name, registry, what: str) -> str:
    close = _closest(name, _registered(registry))
    return f'{where}: {name!r} is no registered {what}' + (f' (did you mean {close}?)' if close else '')


def _accepted(target, supplied=()):
    """``(keywords a section may set, required ones, takes **kwargs)`` of a class or function called as
    ``target(*supplied, **section)``; None when it has no inspectable signature."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n for n, p in params.items() if p.kind in kinds} - set(supplied)
    required = [n for n, p in params.items() if n in named and p.default is inspect.Parameter.empty]
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    return named, required, var_kw


def keyword_problems(where: str, target, section: dict, supplied=(), skip=('type',), what: str = '') -> list:
    """The keys of ``section`` that ``target(*supplied, **section minus skip)`` would refuse with a TypeError:
    unknown keywords (with the closest accepted one; not checked when it takes ``**kwargs``) and missing
    required ones. ``what`` names the target in the messages."""
    accepted = _accepted(target, supplied)
    if accepted is None or not isinstance(section, dict):
        return []
    named, required, var_kw = accepted
    what = what or getattr(target, '__name__', str(target))
    problems = []
    if not var_kw:
        for key in section:
            if key in named or key in skip:
                continue
            hint = '' if _closest(key, named) else f' ({what} takes {", ".join(sorted(named)) or "no keyword"})'
            problems.append(_unknown(where, key, named) + hint)
    problems += [f'missing key {where}.{name} (required by {what})' for name in required if name not in section]
    return problems


def one_line(message) -> str:
    return ' '.join(str(message).split())


# -- --force_yml ---------------------------------------------------------------------------------------------------
def _yml_value(value: str):
    """The value BasicSR's ``_postprocess_yml_value`` makes of a ``--force_yml`` value (1.4.2), with
    ``ast.literal_eval`` where it calls ``eval`` (lists)."""
    if value == '~' or value.lower() == 'none':
        return None
    if value.lower() in ('true', 'false'):
        return value.lower() == 'true'
    if value.startswith('!!float'):
        try:
            return float(value.replace('!!float', ''))
        except ValueError:
            raise OptionError(f'{value!r} is no !!float number') from None
    if value.isdigit():
        return int(value)
    if value.replace('.', '', 1).isdigit() and value.count('.') < 2:
        return float(value)
    if value.startswith('['):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise OptionError(f'{value!r} is not a list literal ({one_line(err)})') from None
    return value


def apply_force_yml(opt: dict, entries) -> dict:
    """What BasicSR's ``--force_yml`` does to ``opt`` (in place), refusing what it would crash on or silently
    mangle. Returns ``{dotted key: entry}`` of the keys set."""
    forced = {}
    for entry in entries or ():
        what = f'--force_yml entry {entry!r}'
        if entry.count('=') != 1:
            raise OptionError(f'{what}: expected exactly one "=", as in train:total_iter=1000 (KEY:SUBKEY=VALUE)')
        keys, value = (s.strip() for s in entry.split('='))
        if value.startswith('{'):
            raise OptionError(f'{what}: BasicSR\'s --force_yml sets scalars and lists only, not a mapping '
                              f'(it would store the string {value!r}); set the leaves one by one, as '
                              f'{keys}:<key>=<value>')
        names = keys.split(':')
        if not keys or not all(names):
            raise OptionError(f'{what}: empty key; expected KEY:SUBKEY=VALUE')
        node, done = opt, []
        for name in names[:-1]:
            if not isinstance(node, dict):
                raise OptionError(f'{what}: {":".join(done)} is no mapping (a {type(node).__name__})')
            if name not in node:
                close = _closest(name, node)
                raise OptionError(f'{what}: the option file has no key {":".join(done + [name])}'
                                  + (f' (did you mean {":".join(done + [close])}?)' if close else '')
                                  + '; --force_yml can only change existing sections')
            node, done = node[name], done + [name]
        if not isinstance(node, dict):
            raise OptionError(f'{what}: {":".join(done)} is no mapping (a {type(node).__name__})')
        if isinstance(node.get(names[-1]), dict):
            raise OptionError(f'{what}: {keys} is a mapping in the option file; --force_yml sets scalars and '
                              f'lists only: set its leaves one by one, as {keys}:<key>=<value>')
        try:
            node[names[-1]] = _yml_value(value)
        except OptionError as err:
            raise OptionError(f'{what}: {err}') from None
        forced['.'.join(names)] = entry
    return forced


# -- before BasicSR's parse_options --------------------------------------------------------------------------------
def _command_line(argv):
    import argparse
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    parser.add_argument('--force_yml', nargs='+', default=None)
    parser.add_argument('--debug', action='store_true')
    args, _ = parser.parse_known_args(argv)
    return args


def _parse_problems(opt: dict, is_train: bool, debug: bool = False) -> list:
    """What BasicSR's ``parse_options`` indexes or computes with itself."""
    problems = []
    if not isinstance(opt.get('name'), str) or not opt.get('name'):
        problems.append('missing key name (the experiment name, a string)' if 'name' not in opt
                        else f'name must be a non-empty string, got {opt["name"]!r}')
    gpus = opt.get('num_gpu', None)
    if 'num_gpu' not in opt:
        problems.append('missing key num_gpu (0 for the CPU, a number of GPUs, or auto: all visible GPUs)')
    elif gpus != 'auto' and not (_is_int(gpus) and gpus >= 0):
        problems.append(f'num_gpu must be an integer >= 0 or auto, got {gpus!r}')
    seed = opt.get('manual_seed')
    if seed is not None and not _is_int(seed):
        problems.append(f'manual_seed must be an integer (or null: a random seed), got {seed!r}')
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict) or not datasets:
        problems.append('missing key datasets (a mapping of dataset sections)' if datasets is None
                        else f'datasets must be a non-empty mapping of dataset sections, got {datasets!r}')
    else:
        for phase, ds in datasets.items():
            if not isinstance(ds, dict):
                problems.append(f'datasets.{phase} must be a mapping (a dataset section), got {ds!r}')
    for section in ('path',) + (('logger',) if is_train else ()):
        if not isinstance(opt.get(section), dict):
            problems.append(f'missing key {section} (a mapping)' if opt.get(section) is None
                            else f'{section} must be a mapping, got {opt[section]!r}')
    for key in ('train', 'val'):
        value = opt.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append(f'{key} must be a mapping, got {value!r}')
    if debug and is_train and 'val' in opt and opt['val'] is None:  # --debug sets val.val_freq
        problems.append('val is empty (null): with --debug write val: {val_freq: 8, save_img: false} or remove it')
    return problems


def read_command_line(argv, is_train: bool):
    """Check the option file and ``--force_yml`` entries of ``argv`` as BasicSR's ``parse_options`` will use them.
    Returns ``(path, forced keys, options)`` with the entries applied (before BasicSR derives anything); raises
    :class:`OptionError`. Without ``-opt`` it leaves the usage error to BasicSR's own parser: ``(None, {}, None)``."""
    from yoda_plugin.utils.options import load_options
    args = _command_line(argv)
    if not args.opt:
        return None, {}, None
    try:
        opt = load_options(args.opt)
    except (ValueError, OSError) as err:
        if isinstance(err, ValueError) and str(err).endswith('got NoneType'):  # nothing but comments, or no byte
            raise OptionError(f'option file {args.opt} is empty: it must contain a mapping at top level') from None
        raise OptionError(one_line(err)) from None
    opt = copy.deepcopy(opt)
    try:
        forced = apply_force_yml(opt, args.force_yml)
    except OptionError as err:
        raise OptionError(f'option file {args.opt}: {err}') from None
    problems = _parse_problems(opt, is_train, args.debug)
    if problems:
        raise OptionError(_report(args.opt, problems, forced))
    return args.opt, forced, opt


def check_command_line(argv, is_train: bool):
    """:func:`read_command_line` without the options: ``(path, forced keys)``."""
    return read_command_line(argv, is_train)[:2]


def _report(source, problems, forced=None) -> str:
    text = f'option file {source}: ' + '; '.join(problems)
    notes = [f'{entry!r}' for key, entry in (forced or {}).items() if key in text]
    if notes:
        text += f' (set by --force_yml {", ".join(notes)})'
    return text


# -- the option tree after parse_options -----------------------------------------------------------------------
def model_extra_keys(model_type) -> dict:
    """``{section: keys}`` a model class reads beyond BasicSR's (``''``: top level), from the
    ``extra_option_keys`` class attributes merged along its class hierarchy."""
    from basicsr.utils.registry import MODEL_REGISTRY
    cls = _registry_get(MODEL_REGISTRY, model_type)
    extra = {}
    for klass in (cls.__mro__ if cls is not None else ()):
        for section, keys in (vars(klass).get('extra_option_keys') or {}).items():
            extra[section] = extra.get(section, set()) | set(keys)
    return extra


def unknown_keys(opt: dict, extra: dict) -> list:
    """Unknown keys of the top level, ``path``, ``train`` and ``logger``: messages naming the closest known key."""
    bad = []
    top = BASICSR_TOP_KEYS | PLUGIN_TOP_KEYS | set(extra.get('', ()))
    for key in opt:
        if key not in top and not str(key).startswith(NETWORK_PREFIX):
            bad.append(_unknown('', key, top | {'network_g', 'network_d'}))
    sections = (('path', PATH_KEYS, PATH_PREFIXES, ()), ('train', TRAIN_KEYS, TRAIN_PREFIXES, TRAIN_SUFFIXES),
                ('logger', LOGGER_KEYS, (), ()))
    for section, keys, prefixes, suffixes in sections:
        value = opt.get(section)
        if not isinstance(value, dict):
            continue
        known = keys | set(extra.get(section, ()))
        candidates = known | {p + 'g' for p in prefixes} | ({'optim_g', 'pixel_opt'} if section == 'train' else set())
        for key in value:
            k = str(key)
            if key not in known and not k.startswith(prefixes) and not k.endswith(suffixes):
                bad.append(_unknown(section, key, candidates))
    wandb = (opt.get('logger') or {}).get('wandb') if isinstance(opt.get('logger'), dict) else None
    if wandb is not None:
        if not isinstance(wandb, dict):
            bad.append(f'logger.wandb must be a mapping ({{project: ..., resume_id: ...}}) or null, got {wandb!r}')
        else:
            bad.extend(_unknown('logger.wandb', k, WANDB_KEYS) for k in wandb if k not in WANDB_KEYS)
    return bad


def _required_whole(section: dict, where: str, key: str, meaning: str, minimum=1) -> list:
    if key not in section:
        return [f'missing key {where}.{key} ({meaning})']
    v = section[key]
    if not _is_whole(v) or v < minimum:
        return [f'{where}.{key} must be a whole number >= {minimum} ({meaning}), got {v!r}']
    return []


def _path_problems(path: dict) -> list:
    problems = []
    for key, value in path.items():
        k = str(key)
        if (k.startswith(('pretrain_network_', 'param_key_')) or k == 'resume_state') \
                and value is not None and not isinstance(value, str):
            problems.append(f'path.{key} must be a string (a file path) or null, got {value!r}')
        if k.startswith('strict_load_') and value is not None and not isinstance(value, bool):
            problems.append(f'path.{key} must be true or false, got {value!r}')
        if k == 'trust_checkpoint' and not isinstance(value, bool):
            problems.append(f'path.trust_checkpoint must be true or false, got {value!r}')
    return problems


def _train_problems(train: dict) -> list:
    problems = _required_whole(train, 'train', 'total_iter', 'the number of training iterations')
    if 'warmup_iter' in train and not _is_whole(train['warmup_iter']):
        problems.append(f'train.warmup_iter must be a whole number (-1: no warm-up), got {train["warmup_iter"]!r}')
    if 'ema_decay' in train and not (_is_number(train['ema_decay']) and 0 <= train['ema_decay'] <= 1):
        problems.append(f'train.ema_decay must be a number in [0, 1] (0: no EMA), got {train["ema_decay"]!r}')
    optim = train.get('optim_g')
    if not isinstance(optim, dict) or 'type' not in optim:
        problems.append('missing key train.optim_g (a mapping with the optimizer type, e.g. {type: AdamW, lr: 5e-5})'
                        if optim is None else f'train.optim_g must be a mapping with a type, got {optim!r}')
    problems += _optimizer_problems(train)
    problems += _loss_problems(train)
    scheduler = train.get('scheduler')
    if not isinstance(scheduler, dict) or 'type' not in scheduler:
        problems.append('missing key train.scheduler (a mapping, e.g. {type: MultiStepLR, milestones: [..], gamma: 1})'
                        if scheduler is None else f'train.scheduler must be a mapping with a type, got {scheduler!r}')
    elif scheduler['type'] not in SCHEDULER_TYPES:
        close = _closest(scheduler['type'], SCHEDULER_TYPES)
        problems.append(f'train.scheduler.type must be one of {", ".join(SCHEDULER_TYPES)}, got '
                        f'{scheduler["type"]!r}' + (f' (did you mean {close}?)' if close else ''))
    else:
        from basicsr.models import lr_scheduler  # BasicSR builds MultiStepLR as its MultiStepRestartLR
        cls = getattr(lr_scheduler, 'MultiStepRestartLR' if scheduler['type'] == 'MultiStepLR' else scheduler['type'],
                      None)
        if cls is not None:
            problems += keyword_problems('train.scheduler', cls, scheduler, supplied=('optimizer',))
    return problems


def _optimizer_problems(train: dict) -> list:
    """``train.optim_*``: a torch.optim class (our models take any; BasicSR's build Adam and a few more by name),
    called as ``cls(params, lr, **rest)``."""
    import torch
    known = sorted(n for n, v in vars(torch.optim).items()
                   if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer)
    problems = []
    for key, section in train.items():
        if not str(key).startswith('optim_') or not isinstance(section, dict) or 'type' not in section:
            continue
        where = f'train.{key}'
        cls = getattr(torch.optim, str(section['type']), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            close = _closest(section['type'], known)
            problems.append(f'{where}.type: {section["type"]!r} is no torch.optim optimizer'
                            + (f' (did you mean {close}?)' if close else ''))
            continue
        problems += keyword_problems(where, cls, section, supplied=('params',), what=f'torch.optim.{cls.__name__}')
    return problems


def _loss_problems(train: dict) -> list:
    """``train.*_opt``: a registered loss class, built as BasicSR's ``build_loss`` does (``cls(**rest)``);
    null means no such loss."""
    from basicsr.utils.registry import LOSS_REGISTRY
    problems = []
    for key, section in train.items():
        if not str(key).endswith('_opt') or section is None:
            continue
        where = f'train.{key}'
        if not isinstance(section, dict) or 'type' not in section:
            problems.append(f'{where} must be a mapping with a loss type (e.g. {{type: MaskedNoiseLoss}}) or null, '
                            f'got {section!r}')
            continue
        cls = _registry_get(LOSS_REGISTRY, section['type'])
        if cls is None:
            problems.append(_unregistered(f'{where}.type', section['type'], LOSS_REGISTRY, 'loss'))
            continue
        problems += keyword_problems(where, cls, section)
    return problems


def _logger_problems(logger: dict) -> list:
    problems = _required_whole(logger, 'logger', 'print_freq', 'log every this many iterations')
    problems += _required_whole(logger, 'logger', 'save_checkpoint_freq', 'save every this many iterations')
    if 'use_tb_logger' in logger and not isinstance(logger['use_tb_logger'], (bool, type(None))):
        problems.append(f'logger.use_tb_logger must be true or false, got {logger["use_tb_logger"]!r}')
    return problems


def _val_problems(opt: dict, is_train: bool, ours: bool) -> list:
    """``ours``: the plugin's models check their val keys themselves (ValOptions)."""
    val = opt.get('val')
    problems = []
    if val is None:
        return [] if is_train else ['missing key val (testing needs val.save_img, and metrics to score)']
    if not ours:
        problems += [_unknown('val', k, BASICSR_VAL_KEYS) for k in val if k not in BASICSR_VAL_KEYS]
    if is_train:
        problems += _required_whole(val, 'val', 'val_freq', 'validate every this many iterations')
    if 'save_img' not in val:
        problems.append('missing key val.save_img (true or false)')
    elif not isinstance(val['save_img'], bool):
        problems.append(f'val.save_img must be true or false, got {val["save_img"]!r}')
    metrics = val.get('metrics')
    if metrics is not None and not isinstance(metrics, dict):
        problems.append(f'val.metrics must be a mapping of metric sections, got {metrics!r}')
    elif metrics:
        problems += _metric_problems(metrics)
    return problems


def _metric_problems(metrics: dict) -> list:
    from basicsr.utils.registry import METRIC_REGISTRY
    problems = []
    for name, mopt in metrics.items():
        where = f'val.metrics.{name}'
        if not isinstance(mopt, dict) or 'type' not in mopt:
            problems.append(f'{where} must be a mapping with a type (e.g. {{type: calculate_psnr, crop_border: 0}})')
            continue
        func = _registry_get(METRIC_REGISTRY, mopt['type'])
        if func is None:
            problems.append(_unregistered(f'{where}.type', mopt['type'], METRIC_REGISTRY, 'metric'))
            continue
        params = inspect.signature(func).parameters
        named = {p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
        known = named | METRIC_KEYS
        # Checked even when the function takes **kwargs: BasicSR's metrics swallow (ignore) unknown keywords.
        problems += [_unknown(where, k, known - {'img', 'img2'}) for k in mopt if k not in known]
        required = [p for p, v in params.items() if p in named and v.default is inspect.Parameter.empty]
        problems += [f'missing key {where}.{p} (required by {mopt["type"]})' for p in required
                     if p not in mopt and p not in ('img', 'img2')]
    return problems


def _attention_meta_problems(meta, where: str) -> list:
    if not meta:
        return []
    if not isinstance(meta, dict):
        return [f'{where}.attention_meta must be a mapping (e.g. {{source: {{name: edge}}}}), got {meta!r}']
    from yoda_plugin.attention import ATTENTION_SOURCES, _init_parameters
    problems = [_unknown(f'{where}.attention_meta', k, ATTENTION_META_KEYS)
                for k in meta if k not in ATTENTION_META_KEYS]
    source = meta.get('source') or {}
    if not isinstance(source, dict):
        return problems + [f'{where}.attention_meta.source must be a mapping with a name, got {source!r}']
    name = source.get('name')
    if name not in ATTENTION_SOURCES:
        close = _closest(name, ATTENTION_SOURCES)
        return problems + [f'{where}.attention_meta.source.name: {name!r} is no registered attention source'
                           + (f' (did you mean {close}?)' if close else '')]
    accepted = {p.name for p in _init_parameters(ATTENTION_SOURCES[name])}
    return problems + [_unknown(f'{where}.attention_meta.source', k, accepted)
                       for k in source if k != 'name' and k not in accepted]


def _dataset_problems(opt: dict, is_train: bool) -> list:
    from basicsr.utils.registry import DATASET_REGISTRY
    problems = []
    datasets = opt['datasets']
    allowed = ('train', 'val') if is_train else ('train', 'val', 'test')
    if is_train and 'train' not in datasets:
        problems.append('missing key datasets.train (training needs a train dataset)')
    for phase, ds in datasets.items():
        where = f'datasets.{phase}'
        if str(phase).split('_')[0] not in allowed or (is_train and str(phase).startswith('train_')):
            problems.append(f'{where}: unknown dataset phase {phase!r}; use ' +
                            ('train, val or val_<n>' if is_train else 'test_<n> or val_<n>'))
        cls = _registry_get(DATASET_REGISTRY, ds.get('type'))
        if 'type' not in ds:
            problems.append(f'missing key {where}.type (a registered dataset, e.g. YODAPairedDataset)')
        elif cls is None:
            problems.append(_unregistered(f'{where}.type', ds['type'], DATASET_REGISTRY, 'dataset'))
        if 'name' not in ds:
            problems.append(f'missing key {where}.name (the dataset name, used in logs and result folders)')
        if str(phase).split('_')[0] == 'train':
            problems += _required_whole(ds, where, 'batch_size_per_gpu', 'images per GPU (or per CPU process)')
            problems += _required_whole(ds, where, 'num_worker_per_gpu', 'data-loader workers; 0: none', minimum=0)
        if cls is not None:
            module = inspect.getmodule(cls)
            known = set().union(*(v for k, v in vars(module).items()
                                  if k.endswith('_DATASET_KEYS') and isinstance(v, (set, frozenset))))
            if known:
                problems += [_unknown(where, k, known) for k in ds if k not in known]
        problems += _attention_meta_problems(ds.get('attention_meta'), where)
    return problems


def _device_problems(opt: dict, cuda_devices) -> list:
    gpus = opt.get('num_gpu')
    if not _is_int(gpus) or gpus == 0:
        return []
    if cuda_devices is None:
        import torch
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_devices == 0:
        return [f'num_gpu is {gpus} but this machine has no CUDA device: set num_gpu: 0 (the CPU) or num_gpu: auto '
                f'(all visible GPUs, 0 here)']
    if gpus > cuda_devices and not opt.get('dist'):
        return [f'num_gpu is {gpus} but only {cuda_devices} CUDA device(s) are visible: set num_gpu: {cuda_devices} '
                f'or num_gpu: auto']
    return []


def _model_problems(opt: dict):
    """Our diffusion models' own option parsing, without building anything: ``(problems, yoda enabled)``."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from yoda_plugin.models.base_model import DiffusionSRModel
    cls = _registry_get(MODEL_REGISTRY, opt.get('model_type'))
    if cls is None or not issubclass(cls, DiffusionSRModel):
        return [], False
    if not _is_int(opt.get('scale')) or opt['scale'] < 1:
        return [f'scale must be a positive integer (the SR factor), got {opt.get("scale")!r}' if 'scale' in opt
                else 'missing key scale (the SR factor)'], False
    probe = cls.__new__(cls)  # no __init__: nothing is built, only the sections are parsed and checked
    try:
        probe.parse_options(copy.deepcopy(opt))
        yoda = probe.yoda
        sampler = getattr(getattr(probe, 'val_opt', None), 'sampler_config', None)
        if sampler is not None and getattr(probe, 'schedule', None) is not None:  # its steps fit the schedule
            sampler.build(probe.schedule, probe.diffusion.sample_steps)
    except (ValueError, TypeError) as err:
        return [one_line(err)], False
    except Exception:  # noqa: BLE001  (parse_options grew a dependency on __init__: check the sections only)
        try:
            yoda = cls.option_sections(copy.deepcopy(opt))['yoda']
        except (ValueError, TypeError) as err:
            return [one_line(err)], False
    return [], bool(getattr(yoda, 'enabled', False))


def _attention_dataset_problems(opt: dict) -> list:
    from basicsr.utils.registry import DATASET_REGISTRY
    problems = []
    for phase, ds in opt['datasets'].items():
        where = f'datasets.{phase}'
        cls = _registry_get(DATASET_REGISTRY, ds.get('type'))
        if cls is None:
            continue
        if ds.get('type') not in ATTENTION_DATASETS and not getattr(cls, 'provides_attention', False):
            problems.append(f'{where}.type is {ds["type"]}, which returns no attention maps, but YODA is on '
                            f'(yoda.enabled: true): use type: {sorted(ATTENTION_DATASETS)[0]} with dataroot_attention '
                            f'(scripts/precompute_attention.py), or yoda: {{enabled: false}}')
        elif not ds.get('dataroot_attention') and ds.get('type') in ATTENTION_DATASETS:
            problems.append(f'missing key {where}.dataroot_attention: YODA is on (yoda.enabled: true) and needs an '
                            f'attention LMDB (scripts/precompute_attention.py), or set yoda: {{enabled: false}}')
    return problems


def option_tree_problems(opt, is_train: bool, cuda_devices=None) -> list:
    """Every problem found in an option tree as BasicSR's ``parse_options`` returns it (messages name the key)."""
    from basicsr.archs import ARCH_REGISTRY
    from basicsr.utils.registry import MODEL_REGISTRY
    if not isinstance(opt, dict):
        return [f'the options must be a mapping at top level, got {type(opt).__name__}']
    problems = _parse_problems(opt, is_train)
    if problems:
        return problems
    if 'model_type' not in opt:
        problems.append('missing key model_type (e.g. SR3Model, SRDiffModel)')
    elif _registry_get(MODEL_REGISTRY, opt['model_type']) is None:
        problems.append(_unregistered('model_type', opt['model_type'], MODEL_REGISTRY, 'model'))
    if 'scale' in opt and (not _is_int(opt['scale']) or opt['scale'] < 1):
        problems.append(f'scale must be a positive integer, got {opt["scale"]!r}')
    problems += unknown_keys(opt, model_extra_keys(opt.get('model_type')))
    for key, net in opt.items():
        if str(key).startswith(NETWORK_PREFIX):
            if not isinstance(net, dict) or 'type' not in net:
                problems.append(f'{key} must be a mapping with a type (a registered architecture), got {net!r}')
            elif _registry_get(ARCH_REGISTRY, net['type']) is None:
                problems.append(_unregistered(f'{key}.type', net['type'], ARCH_REGISTRY, 'architecture'))
            else:
                problems += keyword_problems(key, _registry_get(ARCH_REGISTRY, net['type']), net)
    if 'network_g' not in opt:
        problems.append('missing key network_g (the generator network: a mapping with a type)')
    problems += _path_problems(opt['path'])
    if is_train:
        if not isinstance(opt.get('train'), dict):
            problems.append('missing key train (the training section)')
        else:
            problems += _train_problems(opt['train'])
        problems += _logger_problems(opt['logger'])
    from yoda_plugin.models.base_model import DiffusionSRModel
    model_cls = _registry_get(MODEL_REGISTRY, opt.get('model_type'))
    ours = model_cls is None or issubclass(model_cls, DiffusionSRModel)  # an unknown model_type: said already
    problems += _val_problems(opt, is_train, ours)
    problems += _dataset_problems(opt, is_train)
    problems += _device_problems(opt, cuda_devices)
    if ours and 'yoda' in opt and opt['yoda'] is None:  # YODAConfig cannot tell it from an absent section (vanilla)
        problems.append('yoda is empty (null): write yoda: {enabled: false} for vanilla diffusion, yoda: {enabled: '
                        'true} for YODA with the defaults, or remove the key (vanilla)')
    if not problems:
        model, yoda_on = _model_problems(opt)
        problems += model
        if yoda_on:
            problems += _attention_dataset_problems(opt)
    return problems


def check_option_tree(opt, is_train: bool, source: str = '<options>', forced=None, cuda_devices=None):
    """Raise :class:`OptionError` (one line naming ``source`` and every problem's key) if ``opt`` has problems.
    ``forced``: keys set by ``--force_yml`` (named in the message); ``cuda_devices``: override the visible count."""
    problems = option_tree_problems(opt, is_train, cuda_devices)
    if problems:
        raise OptionError(_report(source, problems, forced))
