"""Every in-memory change this package makes to BasicSR, in one place, each with the versions it targets.

Nothing on disk is patched. Each ``install_*`` function is idempotent and returns what it changed; :data:`PATCHES`
lists them with the BasicSR versions they were written for and are tested against
(``tests/test_runner_patches.py``: the targeted attribute exists as expected, and the patch does what it
says). BasicSR 1.4.2 is both the newest PyPI release and the version of the source checkout's main branch
(``scripts/check_basicsr_checkout.py`` runs BasicSR's own runners from such a checkout).

Two groups:

* at ``import yoda_plugin`` (:func:`install_import_time_fixes`), so that BasicSR's *own* ``train.py`` /
  ``test.py``, which import us while they parse an option file, work: the torchvision alias that basicsr
  1.4.2 from PyPI needs to import at all, ``make_exp_dirs`` that skips ``path.trust_checkpoint``, and
  resume / ``--launcher pytorch`` without CUDA;
* for our runners only (:func:`patch_basicsr_runner`, called by :mod:`yoda_plugin.runner.pipeline`): the safe
  YAML loader, the whole-file option check and the settings record around ``parse_options``, mid-epoch resume,
  per-loader generators, and ``collections.Counter`` allowed in ``weights_only`` loads.
"""
import importlib
import os
import sys
import types

import torch

#: BasicSR versions the patches below were written for and are tested against.
BASICSR_VERSIONS = ('1.4.2',)
USAGE_EXIT_CODE = 2

# Options of our runners' command line that BasicSR's own parser does not know (see runner.pipeline).
RUNNER_FLAGS = {'force': False}


# -- at import time ------------------------------------------------------------------------------------------------
_LEGACY = 'torchvision.transforms.functional_tensor'


def install_torchvision_shim() -> bool:
    """Make ``torchvision.transforms.functional_tensor`` importable (targets basicsr 1.4.2 from PyPI).

    basicsr 1.4.2 (PyPI) does ``from torchvision.transforms.functional_tensor import rgb_to_grayscale`` in
    ``basicsr/data/degradations.py``. torchvision removed that private module in 0.17; the function lives on in
    ``torchvision.transforms.functional``. The old name is aliased in ``sys.modules`` *before* basicsr is
    imported; the source checkout (which imports ``functional``) is unaffected. Returns True when the alias was
    installed, False when torchvision provides the module or the alias is in place.
    """
    if _LEGACY in sys.modules:
        return False
    try:
        importlib.import_module(_LEGACY)
        return False
    except ImportError:
        pass
    functional = importlib.import_module('torchvision.transforms.functional')
    shim = types.ModuleType(_LEGACY)
    shim.__doc__ = 'Alias installed by yoda_plugin.runner.patches for basicsr 1.4.2.'
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    # Anything else basicsr might reach for resolves to the maintained module.
    shim.__getattr__ = lambda name: getattr(functional, name)
    sys.modules[_LEGACY] = shim
    return True


# Keys of the ``path`` section that are switches, not folders. BasicSR's ``make_exp_dirs`` calls ``os.makedirs``
# on every ``path.*`` value whose key does not contain strict_load / pretrain_network / resume / param_key, so
# ``path: {trust_checkpoint: true}`` crashed there with "TypeError: expected str, bytes or os.PathLike object".
PATH_SWITCHES = ('trust_checkpoint',)


def _make_exp_dirs(opt):
    """Make dirs for experiments (BasicSR's, also skipping yoda_plugin's path switches and non-path values).

    Only its code is used, run with the globals of ``basicsr.utils.misc`` (``os``, ``mkdir_and_rename``):
    it may name no global of this module.
    """
    path_opt = opt['path'].copy()
    if opt['is_train']:
        mkdir_and_rename(path_opt.pop('experiments_root'))  # noqa: F821  (basicsr.utils.misc's)
    else:
        mkdir_and_rename(path_opt.pop('results_root'))  # noqa: F821
    for key, path in path_opt.items():
        if ('strict_load' in key) or ('pretrain_network' in key) or ('resume' in key) or ('param_key' in key):
            continue
        if key in ('trust_checkpoint',) or isinstance(path, bool) or path is None:  # = PATH_SWITCHES
            continue
        os.makedirs(path, exist_ok=True)


def install_make_exp_dirs_fix() -> bool:
    """Let BasicSR's ``make_exp_dirs`` skip ``path.trust_checkpoint`` (targets basicsr 1.4.2: ``utils/misc.py``).

    The function's code is replaced in place, so every reference to it sees the fix: ``basicsr.utils``,
    ``basicsr.train`` / ``basicsr.test`` and a ``basicsr/train.py`` run as a script, which all did
    ``from basicsr.utils import make_exp_dirs`` before our option file imported us. Returns True when installed
    now; False when already installed or the installed BasicSR has another ``make_exp_dirs`` (left alone).
    """
    try:
        from basicsr.utils import misc
    except ImportError:
        return False
    func = getattr(misc, 'make_exp_dirs', None)
    func = getattr(func, '__wrapped__', func)  # BasicSR decorates it with @master_only (functools.wraps)
    if func is None or getattr(func, '_yoda_path_switches', False):
        return False
    if func.__code__.co_freevars or not all(name in func.__globals__ for name in ('os', 'mkdir_and_rename')):
        return False
    func.__code__ = _make_exp_dirs.__code__
    func._yoda_path_switches = True
    return True


def flushing_root_logger(get_root_logger):
    """BasicSR's ``get_root_logger`` that first logs what was said before the log file existed
    (:mod:`yoda_plugin.runner.resume`)."""
    if getattr(get_root_logger, '_yoda_flushes', False):
        return get_root_logger
    from .resume import flush_deferred_log

    def wrapped(*args, **kwargs):
        logger = get_root_logger(*args, **kwargs)
        flush_deferred_log(logger)
        return logger

    wrapped._yoda_flushes = True
    wrapped.__wrapped__ = get_root_logger
    return wrapped


def install_runner_fixes(module) -> bool:
    """Make a BasicSR training runner module (``basicsr.train``, or its train.py run as ``__main__``; targets
    basicsr 1.4.2) resume on any device and keep its log. Only that module's globals change. Returns True when
    it was such a module."""
    if module is None or not callable(getattr(module, 'load_resume_state', None)) \
            or not callable(getattr(module, 'train_pipeline', None)):
        return False
    from .resume import load_resume_state_any_device
    module.load_resume_state = load_resume_state_any_device
    if callable(getattr(module, 'get_root_logger', None)):
        module.get_root_logger = flushing_root_logger(module.get_root_logger)
    return True


def _is_basicsr_train_script(module) -> bool:
    pipeline = getattr(module, 'train_pipeline', None)
    code = getattr(pipeline, '__code__', None)
    return code is not None and os.path.normpath(code.co_filename).endswith(os.path.join('basicsr', 'train.py'))


def install_basicsr_runner_fixes() -> list:
    """Let BasicSR's *own* runners work without CUDA once an option file has imported us (targets basicsr 1.4.2).

    Unpatched, BasicSR's ``load_resume_state`` (``--auto_resume`` or ``path.resume_state``) calls
    ``torch.cuda.current_device()`` ("Found no NVIDIA driver"), and ``--launcher pytorch`` ends in
    ``torch.cuda.set_device(rank % 0)`` (ZeroDivisionError). Both are looked up as module globals when
    they are called, which is after BasicSR's ``parse_options`` has read the option file (and imported
    us): ``basicsr.utils.options.init_dist`` and ``load_resume_state`` of ``basicsr.train`` and of a
    ``basicsr/train.py`` run as a script (``__main__``) are replaced by their device-agnostic versions
    (NCCL with CUDA, gloo without; states loaded with ``weights_only=True``). Returns what was patched.
    """
    try:
        import basicsr.utils.options as bopt
    except ImportError:
        return []
    from .dist import init_dist_any_device
    from .resume import load_resume_state_any_device
    patched = []
    if getattr(bopt, 'init_dist', None) is not init_dist_any_device:
        bopt.init_dist = init_dist_any_device
        patched.append('basicsr.utils.options.init_dist')
    for name in ('basicsr.train', '__main__'):
        module = sys.modules.get(name)
        if module is not None and _is_basicsr_train_script(module) \
                and module.load_resume_state is not load_resume_state_any_device and install_runner_fixes(module):
            patched.append(f'{name}.load_resume_state')
    return patched


def install_import_time_fixes() -> list:
    """What ``import yoda_plugin`` installs once BasicSR is importable (after :func:`install_torchvision_shim`)."""
    done = ['make_exp_dirs'] if install_make_exp_dirs_fix() else []
    return done + install_basicsr_runner_fixes()


# -- our runners ---------------------------------------------------------------------------------------------------
def checked_parse_options(parse_options):
    """BasicSR's ``parse_options`` (targets basicsr 1.4.2: ``utils/options.py``) with our checks before and after;
    a problem exits with code 2 and one line, before anything is written.

    Before: the file and ``--force_yml`` (:func:`~yoda_plugin.runner.option_check.read_command_line`). After: the
    whole tree (:func:`~yoda_plugin.runner.option_check.check_option_tree`) and, for training, the settings
    recorded by the experiment it resumes (:func:`~yoda_plugin.runner.settings.check_experiment`; with
    ``--force``, :data:`RUNNER_FLAGS`, the folder is archived instead).
    """
    if getattr(parse_options, '_yoda_checked', False):
        return parse_options
    from yoda_plugin.utils.fingerprint import SettingsMismatch

    from .option_check import OptionError, check_option_tree, one_line, read_command_line
    from .resume import log_when_ready
    from .settings import check_experiment

    def wrapped(root_path, is_train=True):
        try:
            source, forced, file_opt = read_command_line(sys.argv[1:], is_train)
            opt, args = parse_options(root_path, is_train=is_train)
            check_option_tree(opt, is_train, source or args.opt, forced)
            if is_train:
                try:
                    check_experiment(opt, file_opt, RUNNER_FLAGS['force'], lambda m: log_when_ready('warning', m))
                except (SettingsMismatch, ValueError) as err:
                    raise OptionError(f'option file {source or args.opt}: {err}') from None
        except OptionError as err:
            print(f'error: {one_line(err)}', file=sys.stderr, flush=True)  # the wording of our other entry points
            from .dist import close_process_group
            close_process_group()  # --launcher pytorch: every rank refuses alike; gloo would abort at exit
            raise SystemExit(USAGE_EXIT_CODE) from None
        return opt, args

    wrapped._yoda_checked = True
    wrapped.__wrapped__ = parse_options
    return wrapped


def recording_copy_opt_file(copy_opt_file):
    """BasicSR's ``copy_opt_file`` (targets basicsr 1.4.2: called by ``train_pipeline`` right after the experiment
    folder is made, and on resume) that also writes the run's settings record (rank 0)."""
    if getattr(copy_opt_file, '_yoda_records', False):
        return copy_opt_file

    def wrapped(opt_file, experiments_root):
        copy_opt_file(opt_file, experiments_root)
        from basicsr.utils.dist_util import get_dist_info

        from .settings import write_pending_record
        if get_dist_info()[0] == 0:
            write_pending_record()

    wrapped._yoda_records = True
    wrapped.__wrapped__ = copy_opt_file
    return wrapped


def _build_dataloader_own_generator(build):
    """Give each loader its own seeded generator for worker seeds.

    Otherwise every new epoch iterator draws from the global torch RNG, which
    also drives the diffusion noise: a resumed run would then draw differently.
    """
    if getattr(build, '_yoda_wrapped', False):
        return build

    def wrapped(dataset, dataset_opt, num_gpu=1, dist=False, sampler=None, seed=None):
        loader = build(dataset, dataset_opt, num_gpu=num_gpu, dist=dist, sampler=sampler, seed=seed)
        loader.generator = torch.Generator().manual_seed(int(seed or 0))
        return loader

    wrapped._yoda_wrapped = True
    wrapped.__wrapped__ = build
    return wrapped


def install_option_check():
    """Check options in ``basicsr.train`` / ``basicsr.test`` (the functions our runners call); in memory only."""
    import basicsr.test as btest
    import basicsr.train as btrain
    for module in (btrain, btest):
        module.parse_options = checked_parse_options(module.parse_options)


def patch_basicsr_runner():
    """Make BasicSR's pipelines use our safe loader, option check, settings record, device-agnostic init and
    resume (targets basicsr 1.4.2: ``train.py``, ``test.py``, ``utils/options.py``). Only attributes of the
    in-memory ``basicsr.utils.options``, ``basicsr.train`` and ``basicsr.test`` modules change."""
    import collections

    import basicsr.train as btrain
    import basicsr.utils.options as bopt
    import yaml

    from yoda_plugin.utils.options import SafeOptionLoader

    from .dist import init_dist_any_device
    from .resume import resumable_sampler_class
    bopt.ordered_yaml = lambda: (SafeOptionLoader, yaml.SafeDumper)
    bopt.init_dist = init_dist_any_device
    install_runner_fixes(btrain)
    install_option_check()  # the whole option tree checked after parse_options, before anything is made
    btrain.copy_opt_file = recording_copy_opt_file(btrain.copy_opt_file)
    if not getattr(btrain.EnlargedSampler, '_yoda_resumable', False):
        btrain.EnlargedSampler = resumable_sampler_class()
        btrain.EnlargedSampler._yoda_resumable = True
    btrain.build_dataloader = _build_dataloader_own_generator(btrain.build_dataloader)
    # BasicSR's MultiStepRestartLR keeps its milestones in a Counter; allow it
    # in weights_only loading of resume states (a plain dict subclass, no code).
    torch.serialization.add_safe_globals([collections.Counter])


#: Every patch: (function, BasicSR versions it targets, what it changes).
PATCHES = (
    (install_torchvision_shim, BASICSR_VERSIONS, 'sys.modules alias torchvision.transforms.functional_tensor'),
    (install_make_exp_dirs_fix, BASICSR_VERSIONS, 'basicsr.utils.misc.make_exp_dirs code'),
    (install_basicsr_runner_fixes, BASICSR_VERSIONS,
     'basicsr.utils.options.init_dist; load_resume_state, get_root_logger of basicsr.train / a train.py __main__'),
    (patch_basicsr_runner, BASICSR_VERSIONS,
     'basicsr.utils.options.ordered_yaml, init_dist; basicsr.train / basicsr.test parse_options; basicsr.train '
     'load_resume_state, get_root_logger, copy_opt_file, EnlargedSampler, build_dataloader; torch safe globals'),
)
