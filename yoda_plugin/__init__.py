"""YODA (You Only Diffuse Areas) for BasicSR.

``import yoda_plugin`` registers every arch, model, loss, dataset and metric
of this package into BasicSR's registries. Option files trigger that import
themselves with the line ``yoda_plugin: !!python/name:yoda_plugin.__version__``,
which is how BasicSR's own runners (that know nothing of plugins) find us.

The YODA core (``yoda_plugin.core``: masks, samplers, adapters, pipeline) is
plain PyTorch: where BasicSR (or OpenCV / LMDB, which it needs) is not
installed, ``import yoda_plugin.core`` still works and only the BasicSR layer
is missing. ``YODAResolver`` (the inference object) is imported on first use.
"""
__version__ = '0.1.0'

_OPTIONAL = ('basicsr', 'cv2', 'lmdb', 'torchvision')
BASICSR_IMPORT_ERROR = None  # why the BasicSR layer is missing, if it is

try:
    from .runner.patches import install_import_time_fixes, install_torchvision_shim

    install_torchvision_shim()  # before anything imports basicsr 1.4.2
    from . import archs, data, losses, metrics, models  # noqa: F401  (registration)

    install_import_time_fixes()  # BasicSR's own runners: path switches, resume and launch without CUDA
except ModuleNotFoundError as err:
    if err.name is None or err.name.split('.')[0] not in _OPTIONAL:
        raise
    BASICSR_IMPORT_ERROR = err


def __getattr__(name):
    if name == 'YODAResolver':
        from .inference import YODAResolver
        return YODAResolver
    if name in ('archs', 'data', 'losses', 'metrics', 'models') and BASICSR_IMPORT_ERROR is not None:
        raise ImportError(f'yoda_plugin.{name} needs BasicSR and its dependencies: {BASICSR_IMPORT_ERROR} '
                          f'(pip install basicsr opencv-python lmdb); yoda_plugin.core works without them')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
