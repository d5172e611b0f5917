"""Resuming a training run: the newest complete checkpoint on any device, continued mid-epoch.

BasicSR's ``load_resume_state`` (replaced by :func:`load_resume_state_any_device` through
:mod:`yoda_plugin.runner.patches`) loads onto CUDA and takes the newest state blindly; its sampler restarts the
saved epoch from its first batch. What is said before BasicSR has its log file is kept here and logged by the
first ``get_root_logger`` call of the pipeline (see ``patches.flushing_root_logger``).
"""
import os

import torch

from yoda_plugin.utils.torch_io import load_checkpoint, non_finite_tensors, remove_stale_temporary_files

# Messages said before BasicSR has set up its logger (its get_root_logger, called early, would initialise the
# "basicsr" logger without the log file and at WARNING level: the run's whole log would be lost).
_DEFERRED_LOG = []

# Where a resumed run must continue inside its epoch; read once by the train sampler.
_PENDING_RESUME = {}


def log_when_ready(level: str, message: str):
    _DEFERRED_LOG.append((level, message))


def flush_deferred_log(logger):
    while _DEFERRED_LOG:
        level, message = _DEFERRED_LOG.pop(0)
        getattr(logger, level)(message)


def _resume_candidate_problem(state_path: str, model_path: str, device):
    """``(state, None)`` if the pair can be resumed from, else ``(None, why not)``."""
    if not os.path.isfile(model_path):
        return None, f'its {os.path.basename(model_path)} is missing'
    try:
        weights = load_checkpoint(model_path)
    except (ValueError, OSError) as err:
        return None, f'{model_path} cannot be read ({err})'
    nets = {k: v for k, v in weights.items() if isinstance(v, dict)} if isinstance(weights, dict) else {}
    bad = {k: non_finite_tensors(v) for k, v in nets.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        return None, f'{model_path} holds non-finite weights ({", ".join(f"{k}: {v[:3]}" for k, v in bad.items())})'
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is skipped, with its reason)
        return None, f'it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""})'
    if not isinstance(state, dict) or not {'iter', 'epoch', 'optimizers'} <= set(state):
        return None, 'it is not a BasicSR training state (no iter/epoch/optimizers)'
    return state, None


def state_folders(opt) -> tuple:
    """``(training_states, models)`` folders of the run ``opt`` describes."""
    paths = opt.get('path') or {}
    return (paths.get('training_states') or os.path.join('experiments', opt['name'], 'training_states'),
            paths.get('models') or os.path.join('experiments', opt['name'], 'models'))


def load_resume_state_any_device(opt):
    """BasicSR's ``load_resume_state`` without its CUDA assumption, and picky about completeness.

    With ``--auto_resume`` it takes the newest ``<iter>.state`` that loads, whose weights
    ``net_g_<iter>.pth`` exist, load and are finite; newer unusable pairs are skipped with a
    warning naming why (states are written after the weights, both atomically, so a crash leaves
    at most an incomplete newest pair). Leftover ``*.tmp.<pid>`` files of killed saves are removed
    (rank 0). Loaded with ``weights_only=True`` onto the GPU when there is one, else the CPU.
    Everything it has to say is logged once BasicSR's logger has its log file.
    """
    from basicsr.utils import check_resume
    from basicsr.utils.dist_util import get_dist_info

    if torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    paths = opt.get('path') or {}
    state_dir, model_dir = state_folders(opt)
    if get_dist_info()[0] == 0:
        for folder in (state_dir, model_dir):
            for removed in remove_stale_temporary_files(folder):
                log_when_ready('warning', f'removed {removed}: the temporary file of a save that was interrupted')
    path, state = None, None
    if opt.get('auto_resume'):
        iters = []
        if os.path.isdir(state_dir):
            iters = sorted((int(f[:-len('.state')]) for f in os.listdir(state_dir)
                            if f.endswith('.state') and f[:-len('.state')].isdigit()), reverse=True)
        for it in iters:
            candidate = os.path.join(state_dir, f'{it}.state')
            state, why = _resume_candidate_problem(candidate, os.path.join(model_dir, f'net_g_{it}.pth'), device)
            if state is not None:
                path = candidate
                if it != iters[0]:
                    log_when_ready('warning', f'auto_resume: resuming from iteration {it}, the newest complete '
                                              f'checkpoint ({candidate})')
                break
            log_when_ready('warning', f'auto_resume: skipping {candidate}: {why}; trying the previous one')
        if path is not None:
            opt['path']['resume_state'] = path
        elif iters:
            log_when_ready('warning', f'auto_resume: none of the {len(iters)} training state(s) in {state_dir} is '
                                      f'usable (see above): training starts from iteration 0')
    elif paths.get('resume_state'):
        path = paths['resume_state']
        if not os.path.isfile(path):
            raise FileNotFoundError(f'path.resume_state: {path} does not exist')
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:
            raise RuntimeError(f'cannot load the training state {path} (path.resume_state): {err}') from err
    if path is None:
        return None
    check_resume(opt, state['iter'])
    train_opt = (opt.get('datasets') or {}).get('train') or {}
    _PENDING_RESUME.update(epoch=int(state['epoch']), iter=int(state['iter']),
                           batch_size=int(train_opt.get('batch_size_per_gpu', 1)))
    return state


def resumable_sampler_class():
    """BasicSR's EnlargedSampler, continuing mid-epoch after a resume.

    BasicSR restarts the saved epoch from its first batch on resume, so a
    resumed run sees other data than an uninterrupted one. This sampler skips
    the batches of that epoch which the saved iteration count says were
    already used (BasicSR's train loader drops the last incomplete batch, so
    every epoch has ``len(sampler) // batch_size`` iterations).
    """
    from itertools import islice

    from basicsr.data.data_sampler import EnlargedSampler

    class ResumableEnlargedSampler(EnlargedSampler):

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.skip_epoch, self.skip_samples = None, 0
            if _PENDING_RESUME:
                pending = dict(_PENDING_RESUME)
                _PENDING_RESUME.clear()
                per_epoch = max(len(self) // pending['batch_size'], 1)
                done = pending['iter'] - pending['epoch'] * per_epoch
                if 0 < done <= per_epoch:
                    self.skip_epoch, self.skip_samples = pending['epoch'], done * pending['batch_size']

        def __iter__(self):
            indices = super().__iter__()
            if self.epoch == self.skip_epoch:
                self.skip_epoch = None  # only the first pass over the resumed epoch
                return islice(indices, self.skip_samples, None)
            return indices

    return ResumableEnlargedSampler
