#!/usr/bin/env python
"""Run our demo option files with an unmodified BasicSR source checkout's own runners, leaving it untouched.

    python scripts/check_basicsr_checkout.py /path/to/BasicSR [--keep] [--iters 6] [--verbose]

Usually started by ``scripts/check_basicsr_checkout.sh`` (which finds or makes the project's environment).
Nothing is written into the checkout and nothing is downloaded:

1. setup: a temporary work folder (``mktemp -d`` style, removed at the end unless ``--keep``) gets a copy of
   the checkout's ``basicsr/`` package and ``VERSION`` (the tracked files, as they are on disk, when the
   checkout is a git work tree; otherwise the folder without ``__pycache__``/``version.py``), and the
   ``basicsr/version.py`` that BasicSR's ``setup.py`` (``write_version_py``) would write; a virtual
   environment of its own (``python -m venv --without-pip``) reuses the packages of the interpreter running
   this script through a ``.pth`` file (torch etc. are not installed again), with the copy first on
   ``PYTHONPATH``: ``import basicsr`` must resolve to the copy, or the check stops.
2. data: only the demo dataset (``yoda_plugin.demo.build_demo_data``, fewer crops than the demo) under the
   copy's ``datasets/demo``: the option files use relative dataroots, so the runners run in the copy.
3. train: ``basicsr/train.py`` of the copy, ``options/demo/train_sr3_yoda_demo.yml``, half the iterations.
4. resume: the same run again with ``--auto_resume`` up to ``--iters`` (BasicSR's own resume path).
5. test: ``basicsr/test.py`` of the copy, ``options/demo/test_sr3_yoda_demo.yml``, with the resulting
   ``net_g_latest.pth``; the metrics lines of its log are printed.

Each stage's time, the total, and the work folder are printed; a failed stage is named with its error
line and the end of its output, the later stages still run where they can, and the exit code is 1.
"""
import argparse
import hashlib
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_OPT = os.path.join(ROOT, 'options', 'demo', 'train_sr3_yoda_demo.yml')
TEST_OPT = os.path.join(ROOT, 'options', 'demo', 'test_sr3_yoda_demo.yml')
TRAIN_NAME = 'basicsr_checkout_check'
TEST_NAME = 'basicsr_checkout_test'
# Lines of the runners' output shown without --verbose (everything goes to <work>/logs/<stage>.out).
SHOWN = re.compile(r'^\[demo\]|Resuming training|\[epoch|Validation|\t # |Saving models|End of training|Wrote |'
                   r'Loading .* model from|Number of (train|val|test) images|Warning|WARNING|Error|error:')
DATA_SNIPPET = ('import sys; from yoda_plugin.demo import build_demo_data; '
                'print("[check] demo data in", build_demo_data(sys.argv[1], val_per_photo=1, train_photos=("astronaut", "camera")))')
VERIFY_SNIPPET = '''
import os, sys
import basicsr, yoda_plugin
copy = os.path.realpath(sys.argv[1])
where = os.path.realpath(basicsr.__file__)
print(f"[check] python {sys.executable} (prefix {sys.prefix})")
print(f"[check] basicsr {basicsr.__version__} (git {basicsr.__gitsha__}) from {basicsr.__file__}")
print(f"[check] yoda_plugin {yoda_plugin.__version__} from {yoda_plugin.__file__}")
if not where.startswith(copy + os.sep):
    sys.exit(f"[check] error: basicsr was imported from {where}, not from the copy under {copy}")
'''


def log(msg=''):
    print(msg, flush=True)


def is_git_work_tree(path) -> bool:
    try:
        out = subprocess.run(['git', '-C', path, 'rev-parse', '--is-inside-work-tree'], capture_output=True,
                             text=True, env=_git_env())
    except OSError:  # no git on this machine
        return False
    return out.returncode == 0 and out.stdout.strip() == 'true'


def _git_env():
    return dict(os.environ, GIT_OPTIONAL_LOCKS='0')  # read-only git calls: never refresh the index


def git_sha(checkout) -> str:
    """What BasicSR's setup.py records: the first 7 characters of ``git rev-parse HEAD``, else 'unknown'."""
    if not is_git_work_tree(checkout):
        return 'unknown'
    out = subprocess.run(['git', '-C', checkout, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         env=_git_env())
    return out.stdout.strip()[:7] if out.returncode == 0 and out.stdout.strip() else 'unknown'


def copy_checkout(checkout, dest) -> int:
    """Copy ``basicsr/`` and ``VERSION`` of ``checkout`` to ``dest`` (a new folder); returns the file count.

    A git work tree: its tracked files there, as they are on disk (local edits included, untracked and ignored
    files such as an old ``version.py`` or built extensions left out; deleted ones skipped). Otherwise the
    files of ``basicsr/`` without ``__pycache__``, ``*.pyc`` and ``version.py``.
    """
    os.makedirs(dest)
    count = 0
    if is_git_work_tree(checkout):
        out = subprocess.run(['git', '-C', checkout, 'ls-files', '-z', '--', 'basicsr', 'VERSION'],
                             capture_output=True, check=True, env=_git_env())
        names = [n for n in out.stdout.decode('utf-8', 'surrogateescape').split('\0') if n]
    else:
        names = ['VERSION'] if os.path.isfile(os.path.join(checkout, 'VERSION')) else []
        for folder, dirs, files in os.walk(os.path.join(checkout, 'basicsr')):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            rel = os.path.relpath(folder, checkout)
            names += [os.path.join(rel, f) for f in sorted(files) if not f.endswith('.pyc')]
    names = [n for n in names if os.path.normpath(n) != os.path.join('basicsr', 'version.py')]
    for name in names:
        src = os.path.join(checkout, name)
        if not os.path.isfile(src):
            continue  # tracked but deleted in the work tree
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)
        count += 1
    return count


def write_version_py(copy, sha):
    """``basicsr/version.py`` in the copy, in the format of BasicSR's ``setup.py`` ``write_version_py``."""
    with open(os.path.join(copy, 'VERSION'), encoding='utf-8') as f:
        short = f.read().strip()
    info = ', '.join(x if x.isdigit() else f'"{x}"' for x in short.split('.'))
    text = (f"# GENERATED VERSION FILE\n# TIME: {time.asctime()}\n__version__ = '{short}'\n"
            f"__gitsha__ = '{sha}'\nversion_info = ({info})\n")
    with open(os.path.join(copy, 'basicsr', 'version.py'), 'w', encoding='utf-8') as f:
        f.write(text)
    return short


def base_site_dirs():
    """The site-packages of the interpreter running this script (a venv's, or the system's and the user's)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def make_venv(path):
    """A venv without pip whose interpreter also sees this interpreter's packages (a .pth file); its python."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', path], check=True)
    python = os.path.join(path, 'Scripts' if os.name == 'nt' else 'bin', 'python')
    purelib = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             capture_output=True, text=True, check=True).stdout.strip()
    # "import" lines of a .pth file are executed: addsitedir also runs the .pth files there (editable installs).
    with open(os.path.join(purelib, '_check_basicsr_base_env.pth'), 'w', encoding='utf-8') as f:
        f.write(''.join(f'import site; site.addsitedir({d!r})\n' for d in base_site_dirs()))
    return python


def checkout_fingerprint(checkout):
    """What the check must not change: top-level names, names in the runners' output folders, and size and
    mtime of every file under basicsr/ and .git/ (the parts it reads) and of the top-level files."""
    top = sorted(os.listdir(checkout))
    state = {'top': top}
    for name in ('experiments', 'results', 'tb_logger', 'datasets', 'wandb'):
        folder = os.path.join(checkout, name)
        if os.path.isdir(folder):
            state[name] = sorted(os.listdir(folder))
    files = []
    for name in top:
        path = os.path.join(checkout, name)
        if name in ('basicsr', '.git') and os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(folder, n) for n in sorted(names)]
        elif os.path.isfile(path):
            files.append(path)
    digest = hashlib.sha256()
    for path in files:
        st = os.lstat(path)
        digest.update(f'{os.path.relpath(path, checkout)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode(
            'utf-8', 'surrogateescape'))
    state['files'] = (len(files), digest.hexdigest())
    return state


class Stage:
    def __init__(self, name, what):
        self.name, self.what, self.seconds, self.ok, self.error = name, what, 0.0, None, ''


def run_stage(stage, cmd, cwd, env, logs, verbose):
    """Run one stage, its output to ``<logs>/<stage>.out``; shown in full with ``verbose``, else key lines."""
    log(f'\n[check] === {stage.name}: {stage.what} ===')
    log('[check] $ ' + ' '.join(cmd))
    out_path = os.path.join(logs, f'{stage.name}.out')
    lines = []
    start = time.time()
    with open(out_path, 'w', encoding='utf-8') as out:
        # Its own process group: on an interrupt the whole stage (with its own children) is killed.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors='replace', start_new_session=os.name == 'posix')
        try:
            for line in proc.stdout:
                out.write(line)
                lines.append(line.rstrip('\n'))
                if verbose or line.startswith('[check]') or SHOWN.search(line):
                    print('    ' + line.rstrip('\n'), flush=True)
            code = proc.wait()
        except BaseException:
            stage.seconds, stage.ok, stage.error = time.time() - start, False, 'interrupted'
            try:
                os.killpg(proc.pid, signal.SIGKILL) if os.name == 'posix' else proc.kill()
            except OSError:
                pass
            proc.wait()
            raise
    stage.seconds = time.time() - start
    stage.ok = code == 0
    if not stage.ok:
        errors = [ln for ln in lines if re.match(r'^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*', ln)
                  or ln.startswith('[check] error')]
        stage.error = errors[-1] if errors else f'exit code {code}'
        log(f'[check] FAILED stage {stage.name} (exit code {code}) after {stage.seconds:.1f} s: {stage.error}')
        log(f'[check] last lines of its output ({out_path}):')
        for ln in lines[-40:]:
            log('    | ' + ln)
    else:
        log(f'[check] stage {stage.name} done in {stage.seconds:.1f} s')
    return lines


def metrics_lines(results_dir):
    """The metric lines of the newest test log: ['psnr: 12.3456', ...], and the plugin's summary line."""
    logs = sorted(f for f in os.listdir(results_dir) if f.startswith(f'test_{TEST_NAME}_') and f.endswith('.log'))
    if not logs:
        return [], ''
    with open(os.path.join(results_dir, logs[-1]), encoding='utf-8') as f:
        text = f.read()
    metrics = re.findall(r'\t # (\w+): ([-\w.]+)', text)
    extra = re.findall(r'Validation \w+: (YODA pixel-update share.*)', text)
    return [f'{k} {v}' for k, v in metrics], (extra[-1] if extra else '')


def _interrupt(*_):
    raise KeyboardInterrupt()


def run_check(args, checkout, work, stages) -> int:
    """The five stages in ``work``; appends to ``stages``; returns the exit code."""
    copy, logs = os.path.join(work, 'BasicSR'), os.path.join(work, 'logs')
    os.makedirs(logs)
    setup = Stage('setup', 'copy of basicsr/, version.py, own virtual environment')
    stages.append(setup)
    log(f'\n[check] === {setup.name}: {setup.what} ===')
    start = time.time()
    files = copy_checkout(checkout, copy)
    version = write_version_py(copy, git_sha(checkout))
    log(f'[check] copied {files} files of the checkout to {copy}, wrote basicsr/version.py ({version})')
    python = make_venv(os.path.join(work, 'venv'))
    log(f'[check] virtual environment {os.path.join(work, "venv")} (reuses the packages of {sys.executable})')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([copy, ROOT] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.pop('PYTHONHOME', None)
    env['VIRTUAL_ENV'] = os.path.join(work, 'venv')
    env['PATH'] = os.path.dirname(python) + os.pathsep + env.get('PATH', '')
    proc = subprocess.run([python, '-c', VERIFY_SNIPPET, copy], cwd=copy, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    setup.seconds, setup.ok = time.time() - start, proc.returncode == 0
    if not setup.ok:
        setup.error = (proc.stderr.strip().splitlines() or [f'exit code {proc.returncode}'])[-1]
        log(f'[check] FAILED stage setup: {setup.error}\n{proc.stderr[-3000:]}')
        return 1
    log(f'[check] stage setup done in {setup.seconds:.1f} s')

    data = Stage('data', 'the demo dataset only (yoda_plugin.demo.build_demo_data), in the copy')
    stages.append(data)
    run_stage(data, [python, '-c', DATA_SNIPPET, copy], copy, env, logs, args.verbose)
    if not data.ok:
        return 1

    first = args.iters // 2
    train_py = os.path.join(copy, 'basicsr', 'train.py')
    force = ['--force_yml', f'val:val_freq={args.iters}', f'logger:save_checkpoint_freq={first}',
             'logger:print_freq=1', f'name={TRAIN_NAME}']
    train = Stage('train', f"the copy's basicsr/train.py, iterations 1 to {first}")
    stages.append(train)
    run_stage(train, [python, train_py, '-opt', TRAIN_OPT] + force + [f'train:total_iter={first}'], copy, env, logs,
              args.verbose)
    models = os.path.join(copy, 'experiments', TRAIN_NAME, 'models')
    resume = Stage('resume', f"the copy's basicsr/train.py --auto_resume, iterations {first + 1} to {args.iters}")
    if train.ok:
        stages.append(resume)
        lines = run_stage(resume, [python, train_py, '-opt', TRAIN_OPT, '--auto_resume'] + force
                          + [f'train:total_iter={args.iters}'], copy, env, logs, args.verbose)
        if resume.ok and not any('Resuming training' in ln and f'iter: {first}.' in ln for ln in lines):
            resume.ok, resume.error = False, f'no "Resuming training from ... iter: {first}." in its output'
            log(f'[check] FAILED stage resume: {resume.error}')
        if resume.ok and not os.path.isfile(os.path.join(models, f'net_g_{args.iters}.pth')):
            resume.ok, resume.error = False, f'no net_g_{args.iters}.pth after the resumed run'
            log(f'[check] FAILED stage resume: {resume.error}')
    checkpoint = os.path.join(models, 'net_g_latest.pth')
    results = os.path.join(copy, 'results', TEST_NAME)
    if os.path.isfile(checkpoint):
        test = Stage('test', f"the copy's basicsr/test.py with {os.path.relpath(checkpoint, copy)}"
                     + ('' if resume.ok else ' (of the first run: no resumed run)'))
        stages.append(test)
        run_stage(test, [python, os.path.join(copy, 'basicsr', 'test.py'), '-opt', TEST_OPT, '--force_yml',
                         f'path:pretrain_network_g={checkpoint}', f'name={TEST_NAME}'], copy, env, logs, args.verbose)
        if test.ok and not os.path.isfile(os.path.join(results, 'summary_demo_val.json')):
            test.ok, test.error = False, f'no summary_demo_val.json in {results}'
            log(f'[check] FAILED stage test: {test.error}')
        if test.ok:
            metrics, extra = metrics_lines(results)
            log('[check] test metrics (from its log): ' + (', '.join(metrics) or 'none found'))
            if extra:
                log(f'[check] {extra}')
    return 0 if len(stages) == 5 and all(s.ok for s in stages) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkout', help='a BasicSR source checkout (with basicsr/train.py, basicsr/test.py, VERSION)')
    parser.add_argument('--keep', action='store_true', help='keep the work folder (copy, data, results, logs)')
    parser.add_argument('--iters', type=int, default=6,
                        help='training iterations in all (default 6): half in the first run, the rest after '
                             '--auto_resume')
    parser.add_argument('--workdir', default=None,
                        help='folder in which the temporary work folder is made (default: the system\'s, $TMPDIR)')
    parser.add_argument('--verbose', action='store_true', help="show all of the runners' output")
    args = parser.parse_args(argv)
    if args.iters < 2:
        parser.error('--iters must be >= 2 (one run, then one resumed run)')
    checkout = os.path.realpath(args.checkout)
    for rel in ('basicsr/train.py', 'basicsr/test.py', 'VERSION'):
        if not os.path.isfile(os.path.join(checkout, rel)):
            print(f'[check] error: {checkout} is no BasicSR source checkout: {rel} is missing', file=sys.stderr)
            return 2
    if args.workdir and os.path.realpath(args.workdir).startswith(checkout + os.sep):
        print(f'[check] error: --workdir {args.workdir} is inside the checkout', file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, getattr(signal, 'SIGHUP', None)):  # end like Ctrl-C: the work folder is removed
        if sig is not None:
            signal.signal(sig, _interrupt)
    before = checkout_fingerprint(checkout)
    total_start = time.time()
    work = tempfile.mkdtemp(prefix='basicsr_checkout_check.', dir=args.workdir)
    copy = os.path.join(work, 'BasicSR')
    log(f'[check] BasicSR checkout {checkout} (read, never written); work folder {work}'
        + (' (kept: --keep)' if args.keep else ' (removed at the end; --keep keeps it)'))
    stages = []
    try:
        try:
            code = run_check(args, checkout, work, stages)
        except KeyboardInterrupt:
            log('\n[check] interrupted')
            code = 130
        log('\n[check] stage times:')
        for s in stages:
            log(f'  {s.name:<7} {s.seconds:7.1f} s  ' + ('ok' if s.ok else f'FAILED: {s.error}'))
        log(f'  {"total":<7} {time.time() - total_start:7.1f} s')
        if checkout_fingerprint(checkout) != before:
            log(f'[check] FAILED: the checkout {checkout} changed during the check (names or files differ)')
            code = code or 1
        else:
            log(f'[check] checkout unchanged: {checkout} '
                '(top-level names, output folders, files of basicsr/ and .git/)')
        if args.keep:
            log(f'[check] results kept in {work}: training {os.path.join(copy, "experiments", TRAIN_NAME)}, '
                f'test {os.path.join(copy, "results", TEST_NAME)}, stage logs {os.path.join(work, "logs")}')
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            log(f'[check] work folder {work} removed (--keep keeps it)')
    log(f'[check] OK: {checkout} trained, resumed and tested the demo options with its own runners'
        if code == 0 else f'[check] FAILED (exit code {code})')
    return code


if __name__ == '__main__':
    sys.exit(main())
