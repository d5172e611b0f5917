"""YODA (You Only Diffuse Areas) for BasicSR.

``import yoda_plugin`` registers every arch, model, loss, dataset and metric
of this package into BasicSR's registries. Option files trigger that import
themselves with the line ``yoda_plugin: !!python/name:yoda_plugin.__version__``,
which is how BasicSR's own runners (that know nothing of plugins) find us.
"""
__version__ = '0.1.0'

from .compat import install_torchvision_shim

install_torchvision_shim()  # before anything imports basicsr 1.4.2

from . import archs, data, losses, metrics, models  # noqa: E402,F401  (registration)
