"""``python -m yoda_plugin train|test|precompute|prepare|demo|gpu_check ...``"""
import sys


def main():
    modules = {'train': 'yoda_plugin.train', 'test': 'yoda_plugin.test', 'demo': 'yoda_plugin.demo',
               'gpu_check': 'yoda_plugin.apps.gpu_check', 'precompute': 'yoda_plugin.apps.precompute_attention',
               'prepare': 'yoda_plugin.apps.prepare_data'}
    commands = tuple(modules)
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f'usage: python -m yoda_plugin {{{"|".join(commands)}}} [options]', file=sys.stderr)
        return 2
    command = sys.argv.pop(1)
    sys.argv[0] = f'yoda_plugin {command}'
    import importlib
    return importlib.import_module(modules[command]).main()


if __name__ == '__main__':
    sys.exit(main())
