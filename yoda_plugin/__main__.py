"""``python -m yoda_plugin train|test|demo ...``"""
import sys


def main():
    commands = ('train', 'test', 'demo', 'gpu_check')
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f'usage: python -m yoda_plugin {{{"|".join(commands)}}} [options]', file=sys.stderr)
        return 2
    command = sys.argv.pop(1)
    sys.argv[0] = f'yoda_plugin {command}'
    import importlib
    return importlib.import_module(f'yoda_plugin.{command}').main()


if __name__ == '__main__':
    sys.exit(main())
