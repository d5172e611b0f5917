# Registers every *_loss.py of this folder, as BasicSR does for its own.
from yoda_plugin.utils.scan import import_modules

_modules = import_modules(__name__, __file__, 'loss')
