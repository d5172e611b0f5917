"""The networks: every ``*_arch.py`` of this folder registers its classes in BasicSR's ``ARCH_REGISTRY``."""
import copy

from yoda_plugin.utils.scan import import_modules

_modules = import_modules(__name__, __file__, 'arch')


def build_network(opt: dict):
    """``network_g`` of an option dict, built by BasicSR's arch registry (float32, CPU)."""
    from basicsr.archs import build_network as _build
    if not opt.get('network_g'):
        raise ValueError('the options have no network_g section')
    return _build(copy.deepcopy(dict(opt['network_g'])))
