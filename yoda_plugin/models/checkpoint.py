"""Checkpoint I/O shared by the diffusion models: atomic writes, clear load errors, RNG streams, rank checks.

:class:`CheckpointMixin` holds the BasicSR model methods (``load_network``,
``save_network``, ``save_training_state``, ``resume_training``, ``save`` with
the ranks-in-sync check); the functions are usable on their own.
"""
import os
import pickle
import random
from collections import OrderedDict
from os import path as osp

import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, weights_only: bool = True):
    """``torch.load`` on the CPU with errors that name the file and what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only and 'Unsupported global' in str(err):
            raise ValueError(
                f'{path} needs unsafe unpickling (it stores Python objects beyond tensors and plain containers), '
                f'so it was refused under torch.load(weights_only=True). Only if you trust its origin, set '
                f'"path: {{trust_checkpoint: true}}" in the option file to load it with weights_only=False. '
                f'({str(err).splitlines()[0]})') from err
        raise ValueError(f'{path} is not a PyTorch checkpoint: {str(err).splitlines()[-1] or err}') from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (truncated or another format?): {err}') from err


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


def load_network_weights(net, load_path: str, param_key='params', strict: bool = True, trusted: bool = False):
    """Load a BasicSR checkpoint (``{"params": ..., "params_ema": ...}``) into ``net``, with errors that say why not.

    ``param_key`` missing falls back to ``params``; ``trusted`` loads with ``weights_only=False``; not ``strict``
    skips keys the network lacks or holds in another shape.
    """
    state = load_checkpoint(load_path, weights_only=not trusted)
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
        state = OrderedDict((k, v) for k, v in state.items() if k in own and own[k].shape == v.shape)
    net.load_state_dict(state, strict=strict)
    get_root_logger().info(f'Loading {type(net).__name__} model from {load_path}, with param key: [{param_key}].')


class CheckpointMixin:
    """BasicSR checkpoint methods: clear load errors, atomic writes, RNG and loss-scale state, rank checks."""

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loader with clear errors; ``weights_only=True`` unless ``path.trust_checkpoint: true``."""
        load_network_weights(self.get_bare_model(net), load_path, param_key, strict,
                             trusted=bool(self.opt['path'].get('trust_checkpoint', False)))

    def resume_training(self, resume_state):
        """Optimizers and schedulers (BasicSR), then the random number streams of the saved run."""
        super().resume_training(resume_state)
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])
        if 'grad_scaler' in resume_state and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(resume_state['grad_scaler'])

    def save(self, epoch, current_iter):
        super().save(epoch, current_iter)
        if self.opt['dist']:
            self.check_ranks_in_sync(current_iter)

    def check_ranks_in_sync(self, current_iter):
        """All ranks must hold bitwise-identical weights (DDP averages gradients); raise if not."""
        import torch.distributed as dist
        bare = self.get_bare_model(self.net_g)
        sums = torch.stack([p.detach().double().sum() for p in bare.parameters()])
        gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sums)
        worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if worst != 0.0:
            raise RuntimeError(f'ranks out of sync at iteration {current_iter}: parameter checksums differ by {worst}')
        get_root_logger().info(f'Ranks in sync at iteration {current_iter}: identical parameter checksums on '
                               f'{len(gathered)} ranks.')

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's layout (``params`` / ``params_ema``), written atomically."""
        if current_iter == -1:
            current_iter = 'latest'
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, keys):
            state = _strip_module(self.get_bare_model(net_).state_dict())
            save_dict[key] = OrderedDict((k, v.cpu()) for k, v in state.items())
        atomic_torch_save(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth'))

    @master_only
    def save_training_state(self, epoch, current_iter):
        """Optimizers, schedulers and iteration, written atomically (after the weights)."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers], 'rng': rng_state()}
        if self.grad_scaler is not None:  # the loss scale found so far (else a resume restarts at 2^16)
            state['grad_scaler'] = self.grad_scaler.state_dict()
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))
