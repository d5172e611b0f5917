"""Compatibility with PyPI's basicsr 1.4.2 on current torchvision.

basicsr 1.4.2 (the newest release on PyPI) does
``from torchvision.transforms.functional_tensor import rgb_to_grayscale`` in
``basicsr/data/degradations.py``. torchvision removed that private module in
0.17; the function lives on as ``torchvision.transforms.functional``. We alias
the old module name in ``sys.modules`` *before* basicsr is imported. Nothing on
disk is patched, no fork is needed, and newer basicsr (source main, which
already imports ``functional``) is unaffected.
"""
import importlib
import os
import sys
import types

_LEGACY = 'torchvision.transforms.functional_tensor'


def install_torchvision_shim() -> bool:
    """Make ``torchvision.transforms.functional_tensor`` importable.

    Returns True when the alias was installed, False when torchvision already
    provides the module (old torchvision) or the alias is already in place.
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
    shim.__doc__ = 'Alias installed by yoda_plugin.compat for basicsr 1.4.2.'
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    # Anything else basicsr might reach for resolves to the maintained module.
    shim.__getattr__ = lambda name: getattr(functional, name)
    sys.modules[_LEGACY] = shim
    return True


# Keys of the ``path`` section that are switches, not folders. BasicSR's ``make_exp_dirs`` (used by its own
# train.py / test.py and by ours) calls ``os.makedirs`` on every ``path.*`` value whose key does not contain
# strict_load / pretrain_network / resume / param_key, so ``path: {trust_checkpoint: true}`` crashed there
# with "TypeError: expected str, bytes or os.PathLike object, not bool".
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
    """Let BasicSR's ``make_exp_dirs`` skip ``path.trust_checkpoint`` (and other non-path values).

    The function's code is replaced in place, so every reference to it sees the fix: ``basicsr.utils``,
    ``basicsr.train`` / ``basicsr.test`` and a ``basicsr/train.py`` run as a script, which all did
    ``from basicsr.utils import make_exp_dirs`` before our option file imported us. Our option files import
    ``yoda_plugin`` while BasicSR parses them, which is before it makes the experiment folders. Returns True
    when installed now; False when already installed or the installed BasicSR has another ``make_exp_dirs``
    (then it is left alone).
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


def _is_basicsr_train_script(module) -> bool:
    pipeline = getattr(module, 'train_pipeline', None)
    code = getattr(pipeline, '__code__', None)
    return code is not None and os.path.normpath(code.co_filename).endswith(os.path.join('basicsr', 'train.py'))


def install_basicsr_runner_fixes() -> list:
    """Let BasicSR's *own* runners work on a machine without CUDA once an option file has imported us.

    Unpatched, BasicSR's ``load_resume_state`` (``--auto_resume`` or ``path.resume_state``) calls
    ``torch.cuda.current_device()`` ("Found no NVIDIA driver"), and ``--launcher pytorch`` ends in
    ``torch.cuda.set_device(rank % 0)`` (ZeroDivisionError). Both are looked up as module globals when
    they are called, which is after BasicSR's ``parse_options`` has read the option file (and imported
    us): ``basicsr.utils.options.init_dist`` and ``load_resume_state`` of ``basicsr.train`` and of a
    ``basicsr/train.py`` run as a script (``__main__``) are replaced by their device-agnostic versions
    (NCCL with CUDA, gloo without; states loaded with ``weights_only=True``). Returns what was patched.
    """
    import sys
    try:
        import basicsr.utils.options as bopt
    except ImportError:
        return []
    from yoda_plugin.utils.options import init_dist_any_device, install_runner_fixes
    patched = []
    if getattr(bopt, 'init_dist', None) is not init_dist_any_device:
        bopt.init_dist = init_dist_any_device
        patched.append('basicsr.utils.options.init_dist')
    for name in ('basicsr.train', '__main__'):
        module = sys.modules.get(name)
        if module is not None and _is_basicsr_train_script(module) and install_runner_fixes(module):
            patched.append(f'{name}.load_resume_state')
    return patched
