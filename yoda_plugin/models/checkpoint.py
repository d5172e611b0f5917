"""Checkpoint I/O shared by the diffusion models: atomic writes, clear load errors, RNG streams, rank checks.

:class:`CheckpointMixin` holds the BasicSR model methods (``load_network``,
``save_network``, ``save_training_state``, ``resume_training``, ``save`` with
the ranks-in-sync check); the functions are usable on their own.
"""
import os
import pickle
import random
import re
from collections import OrderedDict
from os import path as osp

import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint.

    A full disk raises :class:`~yoda_plugin.utils.disk.DiskFullError` naming ``path`` (torch's own words are
    "enforce fail ... unexpected pos"); the previous file of that name, if any, is left as it was.
    """
    from yoda_plugin.utils.disk import raise_if_disk_full
    tmp = f'{path}{TMP_INFIX}{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (RuntimeError, OSError) as err:
        raise_if_disk_full(err, path)  # before the partial file is removed: its space is the evidence
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Temporary files of atomic_torch_save are named <final name>.tmp.<pid>.
TMP_INFIX = '.tmp.'


def remove_stale_temporary_files(folder: str) -> list:
    """Remove the ``*.tmp.<pid>`` files in ``folder`` that no running process of this machine is writing.

    They are left behind when a run is killed mid-save (the final files are never torn). Returns the removed
    paths. A file whose writer is alive, or whose pid cannot be checked, is kept.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        stem, sep, pid = name.rpartition(TMP_INFIX)
        if not sep or not stem or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # another user's process, or no way to tell: keep its file
    return True


def non_finite_tensors(state: dict) -> list:
    """Keys of the floating-point tensors in ``state`` that hold a NaN or Inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


TRUST_SWITCH = ('"path: {trust_checkpoint: true}" in the option file (YODAResolver: trust_checkpoint=True; '
                'scripts/inference_yoda.py: --trust-checkpoint)')


_TORCH_BOILERPLATE = ('Weights only load failed', 'Check the documentation', 'Please file an issue', '(1)', '(2)')


def _short(err) -> str:
    """The line of torch's long weights-only message that says what was wrong (no colour codes)."""
    lines = [ln.strip() for ln in re.sub(r'\x1b\[[0-9;]*m', '', str(err)).splitlines()]
    lines = [ln.split('WeightsUnpickler error:')[-1].strip() for ln in lines
             if ln and not ln.startswith(_TORCH_BOILERPLATE)]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else str(err)


def _not_a_checkpoint(path: str, why) -> ValueError:
    with open(path, 'rb') as f:
        head = f.read(16)
    kind = ''
    if head and not head.startswith((b'PK', b'\x80')):  # torch.save writes a zip; old torch a pickle (protocol 2+)
        try:
            head.decode('utf-8')
            kind = f', it looks like a text file (starts with {head[:12]!r})'
        except UnicodeDecodeError:
            kind = f', it starts with {head[:8]!r}'
    elif not head:
        kind = ', it is empty'
    return ValueError(f'{path} is not a PyTorch checkpoint (truncated, renamed or another format?){kind}: '
                      f'{type(why).__name__}' + (f': {_short(why)}' if _short(why) else ''))


def load_checkpoint(path: str, weights_only: bool = True):
    """``torch.load`` on the CPU with errors that name the file and what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # torch words a refused global "Unsupported global: GLOBAL m.x ..." or, for a blocked module (os, sys),
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        lines = [ln for ln in str(err).splitlines() if 'unsupported global' in ln.lower()]
        if weights_only and lines:
            detail = _short(lines[0])
            blocked = 'is blocked' in detail
            raise ValueError(
                f'{path} needs unsafe unpickling (it stores Python objects beyond tensors and plain containers), '
                f'so it was refused under torch.load(weights_only=True). '
                + ('It calls a function of os/sys: that is what a malicious file does; do not trust it unless '
                   'you made it. ' if blocked else '')
                + f'Only if you trust its origin, set {TRUST_SWITCH} to load it with weights_only=False. '
                f'({detail})') from err
        raise _not_a_checkpoint(path, err) from err
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as err:
        # A text file renamed .pth reaches the weights-only unpickler as opcodes: IndexError 'pop from empty
        # list', KeyError 101 (a memo index) ... none of which names the file.
        raise _not_a_checkpoint(path, err) from err


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]), 'numpy_has_gauss': int(np_state[3]), 'numpy_gauss': float(np_state[4]),
        'python_keys': torch.tensor(py_keys, dtype=torch.int64), 'python_version': int(py_version),
        'python_gauss': py_gauss,
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    random.setstate((state['python_version'], tuple(int(v) for v in state['python_keys'].tolist()),
                     state['python_gauss']))


def _strip_module(state) -> OrderedDict:
    return OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in state.items())


# A non-strict load that fills less than this share of the network's tensors is refused: it is a wrong file.
MIN_LOADED_SHARE = 0.5


def load_network_weights(net, load_path: str, param_key='params', strict: bool = True, trusted: bool = False):
    """Load a BasicSR checkpoint (``{"params": ..., "params_ema": ...}``) into ``net``, with errors that say why not.

    ``param_key`` missing falls back to ``params``; ``trusted`` loads with ``weights_only=False``; not ``strict``
    skips keys the network lacks or holds in another shape, listing each in a warning, and refuses a file that
    fills less than half of the network's tensors. The published SR3 (Janspiry) and SRDiff files are recognised
    and mapped onto ``net`` (:mod:`yoda_plugin.checkpoints`); ``param_key`` does not apply to them.
    """
    state = load_checkpoint(load_path, weights_only=not trusted)
    from yoda_plugin.checkpoints import FORMATS, detect_format, fit_network
    public = detect_format(state)
    if public in FORMATS:
        state = fit_network(net, state, load_path, public, strict, warn=get_root_logger().warning)
        get_root_logger().info(f'Loading: {load_path} is a published {public} checkpoint, mapped onto '
                               f'{type(net).__name__}.')
        param_key = None
    if param_key is not None and isinstance(state, dict) and param_key in state:
        state = state[param_key]
    elif param_key is not None and isinstance(state, dict) and 'params' in state:
        get_root_logger().info(f'Loading: {param_key} does not exist in {load_path}, use params.')
        state = state['params']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{load_path} holds no network weights under "{param_key}" (expected a state dict '
                         f'saved by BasicSR: {{"params": ..., "params_ema": ...}})')
    state = _strip_module(state)
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or wrong):
        raise ValueError(
            f'{load_path} does not fit {type(net).__name__} (network_g options or another architecture?): '
            f'{len(missing)} missing key(s) {missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}, '
            f'{len(wrong)} of another shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}')
    if not strict:
        state_all = state
        state = OrderedDict((k, v) for k, v in state.items() if k in own and own[k].shape == v.shape)
        if len(state) < MIN_LOADED_SHARE * len(own):
            raise ValueError(
                f'{load_path} fills only {len(state)} of the {len(own)} tensors of {type(net).__name__} (under '
                f'{MIN_LOADED_SHARE:.0%}; strict_load is false): another architecture or network_g options? '
                f'{len(unexpected)} key(s) the network lacks, e.g. {unexpected[:4]}; {len(wrong)} of another shape, '
                f'e.g. {[(k, tuple(state_all[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}; {len(missing)} '
                f'network key(s) not in the file, e.g. {missing[:4]}')
        if missing or unexpected or wrong:  # BasicSR lists these too; a silent partial load hides a wrong file
            get_root_logger().warning(
                f'strict_load is false: loaded {len(state)} of {len(own)} tensors of {type(net).__name__} from '
                f'{load_path}; dropped {len(unexpected)} key(s) the network lacks {unexpected}, '
                f'{len(wrong)} of another shape '
                f'{[(k, tuple(state_all[k].shape), tuple(own[k].shape)) for k in wrong]}; '
                f'{len(missing)} network key(s) not in the file keep their initial values {missing}')
    net.load_state_dict(state, strict=strict)
    get_root_logger().info(f'Loading {type(net).__name__} model from {load_path}, with param key: [{param_key}].')


class CheckpointMixin:
    """BasicSR checkpoint methods: clear load errors, atomic writes, RNG and loss-scale state, rank checks."""

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loader with clear errors; ``weights_only=True`` unless ``path.trust_checkpoint: true``."""
        load_network_weights(self.get_bare_model(net), load_path, param_key, strict,
                             trusted=bool(self.opt['path'].get('trust_checkpoint', False)))

    def check_resumed_optimizers(self, resume_state):
        """Refuse a state saved by another optimizer type (loaded, it fails at the first step: KeyError 'momentum').

        States record ``optimizer_types``; for older ones, a saved parameter group lacking hyper-parameters of the
        configured optimizer gives it away (keys that torch fills in itself are not counted).
        """
        saved_types = resume_state.get('optimizer_types') or []
        filled_by_torch = {'foreach', 'maximize', 'capturable', 'differentiable', 'fused', 'decoupled_weight_decay'}
        where = self.opt['path'].get('resume_state') or 'the training state'
        for i, (optimizer, saved) in enumerate(zip(self.optimizers, resume_state.get('optimizers') or [])):
            option = 'train.optim_g.type' if i == 0 else f'the type of optimizer {i}'
            now = type(optimizer).__name__
            if i < len(saved_types) and saved_types[i] != now:
                raise ValueError(f'cannot resume from {where}: {option} is {now} but the state was saved by '
                                 f'{saved_types[i]}; set {option}: {saved_types[i]} to resume, or start a new run '
                                 f'(another name, or pretrain_network_g for the weights only)')
            groups = (saved.get('param_groups') or []) if isinstance(saved, dict) else []
            lacking = sorted(set(optimizer.defaults) - filled_by_torch - set(groups[0])) if groups else []
            if lacking:
                raise ValueError(f'cannot resume from {where}: {option} is {now} but the state was saved by another '
                                 f'optimizer type (its parameter groups lack {lacking}); set {option} to the type '
                                 f'of the saved run to resume, or start a new run')

    def resume_training(self, resume_state):
        """Optimizers and schedulers (BasicSR), then the random number streams of the saved run."""
        self.check_resumed_optimizers(resume_state)
        super().resume_training(resume_state)
        if 'iter' in resume_state:  # a resumed run with nothing left to train still knows its last iteration
            self.last_iter = int(resume_state['iter'])
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])
        if 'grad_scaler' in resume_state and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(resume_state['grad_scaler'])

    def update_learning_rate(self, current_iter, warmup_iter=-1):
        """BasicSR's, called once per iteration by its training loop: also remember the iteration."""
        self.last_iter = current_iter
        return super().update_learning_rate(current_iter, warmup_iter=warmup_iter)

    def save(self, epoch, current_iter):
        super().save(epoch, current_iter)
        if self.opt['dist']:
            self.check_ranks_in_sync(current_iter)

    def _iteration_label(self, current_iter) -> str:
        """BasicSR's final save passes ``current_iter=-1`` (files ``*_latest``): name the real iteration."""
        if current_iter != -1:
            return str(current_iter)
        last = getattr(self, 'last_iter', None)
        return f'{last} (final save, latest)' if last is not None else 'latest (final save)'

    def check_ranks_in_sync(self, current_iter):
        """All ranks must hold bitwise-identical weights (DDP averages gradients); raise if not."""
        import torch.distributed as dist
        bare = self.get_bare_model(self.net_g)
        sums = torch.stack([p.detach().double().sum() for p in bare.parameters()])
        gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sums)
        worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if worst != 0.0:
            raise RuntimeError(f'ranks out of sync at iteration {self._iteration_label(current_iter)}: parameter '
                               f'checksums differ by {worst}')
        get_root_logger().info(f'Ranks in sync at iteration {self._iteration_label(current_iter)}: identical '
                               f'parameter checksums on {len(gathered)} ranks.')

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's layout (``params`` / ``params_ema``), written atomically."""
        if current_iter == -1:
            current_iter = 'latest'
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        path = osp.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth')
        for net_, key in zip(nets, keys):
            state = _strip_module(self.get_bare_model(net_).state_dict())
            save_dict[key] = OrderedDict((k, v.cpu()) for k, v in state.items())
            bad = non_finite_tensors(save_dict[key])
            if bad:  # never write a checkpoint that a resume (or a user) would take for a good one
                raise FloatingPointError(f'refusing to save {path}: {len(bad)} tensor(s) of {key} hold NaN or Inf '
                                         f'(e.g. {bad[:4]}); the previous checkpoints are kept')
        atomic_torch_save(save_dict, path)

    @master_only
    def save_training_state(self, epoch, current_iter):
        """Optimizers, schedulers and iteration, written atomically (after the weights)."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers], 'rng': rng_state(),
                 'optimizer_types': [type(o).__name__ for o in self.optimizers]}
        if self.grad_scaler is not None:  # the loss scale found so far (else a resume restarts at 2^16)
            state['grad_scaler'] = self.grad_scaler.state_dict()
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))
