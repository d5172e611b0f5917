"""``python -m yoda_plugin COMMAND [options]``; ``python -m yoda_plugin --help`` lists the commands."""
import sys

# command -> (module whose main() runs it, what it does in one line)
COMMANDS = {
    'sr': ('yoda_plugin.apps.sr', 'super-resolve an image or a folder with a checkpoint (no option file needed)'),
    'demo': ('yoda_plugin.demo', "test the shipped demo models (converged), then train both briefly from scratch"),
    'train': ('yoda_plugin.train', 'train a model with BasicSR from an option file (-opt OPTIONS)'),
    'test': ('yoda_plugin.test', 'test a model with BasicSR from an option file (-opt OPTIONS): images and metrics'),
    'prepare': ('yoda_plugin.apps.prepare_data', "prepare the paper's datasets as BasicSR LMDBs"),
    'precompute': ('yoda_plugin.apps.precompute_attention', 'precompute attention maps of LR images into an LMDB'),
    'gpu_check': ('yoda_plugin.apps.gpu_check', 'check the GPU paths (training, sampling, fast paths) on this machine'),
    'app': ('yoda_plugin.apps.app', 'start the page to try the models in a browser (pip install -e .[app])'),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ['usage: python -m yoda_plugin COMMAND [options]   (python -m yoda_plugin COMMAND --help for its options)',
             '', 'commands:']
    lines += [f'  {name:<{width}}  {text}' for name, (_, text) in COMMANDS.items()]
    return '\n'.join(lines)


def main():
    if len(sys.argv) >= 2 and sys.argv[1] in ('-h', '--help', 'help'):
        print(usage())
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f'unknown command {sys.argv[1]!r}\n' if len(sys.argv) >= 2 else ''
        print(f'{given}{usage()}', file=sys.stderr)
        return 2
    command = sys.argv.pop(1)
    sys.argv[0] = f'yoda_plugin {command}'
    import importlib
    return importlib.import_module(COMMANDS[command][0]).main()


if __name__ == '__main__':
    sys.exit(main())
