"""BasicSR-style registration: import every ``*_<suffix>.py`` of a package."""
import importlib
import os


def import_modules(package: str, package_file: str, suffix: str) -> list:
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(f'_{suffix}.py'))
    return [importlib.import_module(f'{package}.{name}') for name in names]
