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
