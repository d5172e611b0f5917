"""The settings record of an experiment folder: a resumed training run with other settings is refused before
anything is written (``--force``: the folder is archived and the run starts afresh); utils/fingerprint.py."""
import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from conftest import PYTHON, mentions, run_env, tiny_options, train_log, write_options

from yoda_plugin.runner import patches
from yoda_plugin.runner.settings import RECORD_FILE, training_settings
from yoda_plugin.utils import fingerprint
from yoda_plugin.utils.options import SafeOptionLoader

DATA = os.path.join('nonexistent', 'data')  # never read: the check comes first


def _files(root):
    """{relative path: md5} of every file under ``root`` (what a refused command must leave as it was)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
    return out


@pytest.fixture
def parse(tmp_path, monkeypatch, capsys):
    """``parse(opt, *args)``: write ``opt`` and run the checked ``parse_options`` as our training runner does;
    returns ``(exit code or None, stderr, parsed options or None)``."""
    import basicsr.utils.options as bopt
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bopt, 'ordered_yaml', lambda: (SafeOptionLoader, yaml.SafeDumper))
    monkeypatch.setattr(bopt, 'set_random_seed', lambda seed: None)
    monkeypatch.setitem(patches.RUNNER_FLAGS, 'force', False)

    def run(opt, *args, force=False):
        path = write_options(tmp_path / f'train_{len(os.listdir(tmp_path))}.yml', opt)
        monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', path, *args])
        patches.RUNNER_FLAGS['force'] = force
        try:
            parsed, _ = patches.checked_parse_options(bopt.parse_options)(str(tmp_path), is_train=True)
        except SystemExit as exit_:
            return exit_.code, capsys.readouterr().err.strip(), None
        return None, capsys.readouterr().err.strip(), parsed

    return run


def _recorded_experiment(tmp_path, opt):
    """experiments/<name> as a finished run of ``opt`` leaves it (its record, an option copy, a state)."""
    exp = tmp_path / 'experiments' / opt['name']
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'training_states' / '2.state').write_bytes(b'state')
    (exp / 'train.yml').write_text('the copy of the first run\n')
    fingerprint.write_record(str(exp / RECORD_FILE), training_settings(opt))
    return exp


def test_resume_with_another_network_is_refused_naming_the_keys_and_changes_nothing(tmp_path, parse):
    opt = tiny_options(DATA, name='run')
    exp = _recorded_experiment(tmp_path, opt)
    before = _files(tmp_path / 'experiments')
    opt['network_g']['base_channels'] = 32
    opt['train']['optim_g']['lr'] = 2e-3
    code, err, _ = parse(opt, '--auto_resume')
    assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err
    assert str(exp) in err and 'network_g.base_channels: 16 -> 32' in err and 'train.optim_g.lr: 0.001 -> 0.002' in err
    assert 'another name' in err and '--force' in err
    assert _files(tmp_path / 'experiments') == before


def test_resume_with_what_does_not_change_the_weights_is_allowed(tmp_path, parse):
    opt = tiny_options(DATA, name='run')
    _recorded_experiment(tmp_path, opt)
    opt['train']['total_iter'] = 40  # train longer
    opt['val']['val_freq'] = 3
    opt['logger']['print_freq'] = 7
    opt['datasets']['train']['num_worker_per_gpu'] = 1
    code, err, parsed = parse(opt, '--auto_resume')
    assert code is None and parsed['auto_resume'] is True, err


def test_force_archives_the_experiment_and_starts_afresh(tmp_path, parse):
    opt = tiny_options(DATA, name='run')
    exp = _recorded_experiment(tmp_path, opt)
    before = _files(exp)
    opt['network_g']['base_channels'] = 32
    code, err, parsed = parse(opt, '--auto_resume', force=True)
    assert code is None, err
    assert parsed['auto_resume'] is False and parsed['path']['resume_state'] is None
    archived = [n for n in os.listdir(tmp_path / 'experiments') if n.startswith('run_archived_')]
    assert len(archived) == 1 and not exp.exists()
    assert _files(tmp_path / 'experiments' / archived[0]) == before


def test_a_new_run_of_an_existing_name_is_left_to_basicsr(tmp_path, parse):
    """Without a resume BasicSR archives the folder itself (its mkdir_and_rename): nothing to refuse."""
    opt = tiny_options(DATA, name='run')
    _recorded_experiment(tmp_path, opt)
    opt['network_g']['base_channels'] = 32
    code, err, _ = parse(opt)
    assert code is None, err


def test_fingerprint_differences_and_records(tmp_path):
    flat = fingerprint.flatten({'a': {'b': 1, 'c': [1, 2]}, 'd': {}, 'e': None})
    assert flat == {'a.b': 1, 'a.c': [1, 2], 'd': {}, 'e': None}
    assert fingerprint.differences({'a': 1, 'b': True, 'c': 2}, {'a': 1, 'b': 1, 'd': 3}) == [
        'b: true -> 1', 'c: 2 -> (absent)', 'd: (absent) -> 3']
    path = str(tmp_path / 'record.json')
    assert fingerprint.read_record(path) is None
    fingerprint.write_record(path, flat, name='x')
    assert fingerprint.read_record(path) == flat
    assert fingerprint.check_record(path, flat, 'maps', 'use another --output', 'rerun with --force')
    with pytest.raises(fingerprint.SettingsMismatch) as info:
        fingerprint.check_record(path, {**flat, 'a.b': 2}, 'maps', 'use another --output', 'rerun with --force')
    assert info.value.keys == ['a.b'] and 'a.b: 1 -> 2' in str(info.value) and '--output' in str(info.value)
    (tmp_path / 'record.json').write_text('{torn')
    with pytest.raises(ValueError, match=mentions('record.json', 'read')):
        fingerprint.read_record(path)
    folder = tmp_path / 'out.lmdb'
    folder.mkdir()
    moved = fingerprint.archive(str(folder))
    assert os.path.isdir(moved) and not folder.exists() and os.path.basename(moved).startswith('out.lmdb_archived_')


@pytest.mark.slow
def test_training_runner_refuses_to_resume_another_network_before_writing(tiny_data, tmp_path):
    """A real run, then ``--auto_resume`` with another network_g: exit 2, one line, the experiment's files (its
    option copy among them) byte for byte as they were; the same settings with more iterations resume."""
    opt = tiny_options(tiny_data, name='fp', total_iter=2, logger__save_checkpoint_freq=2, val__val_freq=10 ** 6,
                       logger__use_tb_logger=False)
    first = write_options(tmp_path / 'first.yml', opt)
    opt['network_g']['base_channels'] = 32
    other = write_options(tmp_path / 'other.yml', opt)

    def train(path, *args):
        return subprocess.run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', path, *args], cwd=tmp_path,
                              env=run_env(), capture_output=True, text=True, timeout=600)

    proc = train(first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'fp'
    assert (exp / RECORD_FILE).is_file()
    before = _files(tmp_path / 'experiments')
    proc = train(other, '--auto_resume')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith('error: option file ') and 'network_g.base_channels: 16 -> 32' in line
    assert _files(tmp_path / 'experiments') == before
    proc = train(first, '--auto_resume', '--force_yml', 'train:total_iter=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Resuming training from epoch' in train_log(str(exp)) and os.listdir(tmp_path / 'experiments') == ['fp']
