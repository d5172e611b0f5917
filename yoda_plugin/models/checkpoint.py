"""BasicSR checkpoints of the diffusion models: the weights layout, RNG streams, rank checks.

:class:`CheckpointMixin` holds the BasicSR model methods (``load_network``,
``save_network``, ``save_training_state``, ``resume_training``, ``save`` with
the ranks-in-sync check); the functions are usable on their own. Generic file
I/O (atomic save, safe load, finiteness) is :mod:`yoda_plugin.utils.torch_io`,
re-exported here.
"""
import random
from collections import OrderedDict
from os import path as osp

import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from ..checkpoints.loading import MIN_LOADED_SHARE, load_network_weights  # noqa: F401  (BasicSR layout, re-exported)
from ..utils.torch_io import (TMP_INFIX, TRUST_SWITCH, UnsafeCheckpointError, atomic_torch_save,  # noqa: F401
                              load_checkpoint, non_finite_tensors, remove_stale_temporary_files)


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
        """BasicSR's layout (``params`` / ``params_ema``) plus the model's ``checkpoint_record()`` (``yoda_record``),
        written atomically."""
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
        record = getattr(self, 'checkpoint_record', None)
        if record is not None:  # beside the weights: what rebuilds network and pipeline (BasicSR ignores it)
            save_dict['yoda_record'] = record()
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
