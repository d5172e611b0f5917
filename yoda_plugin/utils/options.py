"""Safe option-file parsing and runner set-up shared by our train/test entry points.

Our option files start with ``yoda_plugin: !!python/name:yoda_plugin.__version__``.
BasicSR's own runners load YAML with PyYAML's full (unsafe) ``Loader``, which
imports the named module: that is how an unmodified BasicSR registers our
classes. Our runners never use that loader: they parse with ``SafeLoader``
extended by exactly one constructor, which accepts ``python/name`` tags only
for attributes of the ``yoda_plugin`` package and refuses everything else.
"""
import os
from collections import OrderedDict

import torch
import yaml

PLUGIN_TAG_PREFIX = 'tag:yaml.org,2002:python/name:'
ALLOWED_MODULE = 'yoda_plugin'


class SafeOptionLoader(yaml.SafeLoader):
    """SafeLoader + OrderedDict mappings + ``!!python/name:yoda_plugin.*``."""


def _construct_mapping(loader, node):
    if not getattr(loader, '_yoda_duplicates_checked', False):  # the first mapping is the root: check the file once
        loader._yoda_duplicates_checked = True
        from .option_check import refuse_duplicate_keys
        refuse_duplicate_keys(node)  # a repeated key (PyYAML keeps the last) is an error naming it and both lines
    return OrderedDict(loader.construct_pairs(node))


def _construct_plugin_name(loader, suffix, node):
    module, _, attr = suffix.rpartition('.')
    if module != ALLOWED_MODULE and not module.startswith(ALLOWED_MODULE + '.'):
        raise yaml.constructor.ConstructorError(
            None, None, f'refusing tag !!python/name:{suffix}: option files may only name attributes of '
            f'{ALLOWED_MODULE} (safe loading)', node.start_mark)
    import importlib
    obj = importlib.import_module(module)
    if not hasattr(obj, attr):
        raise yaml.constructor.ConstructorError(None, None, f'{module} has no attribute {attr!r}', node.start_mark)
    return getattr(obj, attr)


SafeOptionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
SafeOptionLoader.add_multi_constructor(PLUGIN_TAG_PREFIX, _construct_plugin_name)



def load_options(path: str) -> dict:
    """Parse an option file safely; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'option file not found: {path}')
    with open(path, 'r', encoding='utf-8') as f:
        try:
            opt = yaml.load(f, Loader=SafeOptionLoader)
        except yaml.YAMLError as err:
            raise ValueError(f'cannot parse option file {path}: {err}') from err
    if not isinstance(opt, dict):
        raise ValueError(f'option file {path} must contain a mapping at top level, got {type(opt).__name__}')
    return opt


def init_dist_any_device(launcher: str, backend=None, **kwargs):
    """BasicSR's ``init_dist`` for CUDA *and* CPU.

    BasicSR's pytorch launcher hard-codes NCCL and ``torch.cuda.set_device``
    (a ZeroDivisionError without GPUs). We pick NCCL with CUDA and gloo
    without, reading RANK/WORLD_SIZE/LOCAL_RANK that torchrun sets.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    if launcher == 'slurm':
        from basicsr.utils.dist_util import init_dist
        return init_dist(launcher, backend=backend or 'nccl', **kwargs)
    if launcher != 'pytorch':
        raise ValueError(f'unknown launcher {launcher!r}; use none, pytorch or slurm')
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = backend or 'nccl'
    else:
        backend = backend or 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def close_process_group():
    """Tear down the process group of a distributed run before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads are destroyed while
    still joinable, which aborts the process ("terminate called without an
    active exception", SIGABRT) after a run that otherwise succeeded.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Messages said before BasicSR has set up its logger (its get_root_logger, called early, would initialise the
# "basicsr" logger without the log file and at WARNING level: the run's whole log would be lost). They are
# logged by the first get_root_logger call of the training pipeline (see install_runner_fixes).
_DEFERRED_LOG = []


def _log_when_ready(level: str, message: str):
    _DEFERRED_LOG.append((level, message))


def _flushing_root_logger(get_root_logger):
    """BasicSR's ``get_root_logger`` that first logs what was said before the log file existed."""
    if getattr(get_root_logger, '_yoda_flushes', False):
        return get_root_logger

    def wrapped(*args, **kwargs):
        logger = get_root_logger(*args, **kwargs)
        while _DEFERRED_LOG:
            level, message = _DEFERRED_LOG.pop(0)
            getattr(logger, level)(message)
        return logger

    wrapped._yoda_flushes = True
    wrapped.__wrapped__ = get_root_logger
    return wrapped


def _resume_candidate_problem(state_path: str, model_path: str, device):
    """``(state, None)`` if the pair can be resumed from, else ``(None, why not)``."""
    from yoda_plugin.models.checkpoint import load_checkpoint, non_finite_tensors
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

    from yoda_plugin.models.checkpoint import remove_stale_temporary_files
    if torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    paths = opt.get('path') or {}
    state_dir = paths.get('training_states') or os.path.join('experiments', opt['name'], 'training_states')
    model_dir = paths.get('models') or os.path.join('experiments', opt['name'], 'models')
    if get_dist_info()[0] == 0:
        for folder in (state_dir, model_dir):
            for removed in remove_stale_temporary_files(folder):
                _log_when_ready('warning', f'removed {removed}: the temporary file of a save that was interrupted')
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
                    _log_when_ready('warning', f'auto_resume: resuming from iteration {it}, the newest complete '
                                               f'checkpoint ({candidate})')
                break
            _log_when_ready('warning', f'auto_resume: skipping {candidate}: {why}; trying the previous one')
        if path is not None:
            opt['path']['resume_state'] = path
        elif iters:
            _log_when_ready('warning', f'auto_resume: none of the {len(iters)} training state(s) in {state_dir} is '
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


def install_runner_fixes(module) -> bool:
    """Make a BasicSR training runner module (``basicsr.train``, or its train.py run as ``__main__``) resume on
    any device and keep its log. Only that module's globals change. Returns True when it was such a module."""
    if module is None or not callable(getattr(module, 'load_resume_state', None)) \
            or not callable(getattr(module, 'train_pipeline', None)):
        return False
    module.load_resume_state = load_resume_state_any_device
    if callable(getattr(module, 'get_root_logger', None)):
        module.get_root_logger = _flushing_root_logger(module.get_root_logger)
    return True


# Where a resumed run must continue inside its epoch; read once by the train sampler.
_PENDING_RESUME = {}


def _resumable_sampler_class():
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


def _build_dataloader_own_generator(build):
    """Give each loader its own seeded generator for worker seeds.

    Otherwise every new epoch iterator draws from the global torch RNG, which
    also drives the diffusion noise: a resumed run would then draw differently.
    """
    def wrapped(dataset, dataset_opt, num_gpu=1, dist=False, sampler=None, seed=None):
        loader = build(dataset, dataset_opt, num_gpu=num_gpu, dist=dist, sampler=sampler, seed=seed)
        loader.generator = torch.Generator().manual_seed(int(seed or 0))
        return loader

    return wrapped


def patch_basicsr_runner():
    """Make BasicSR's pipelines use our safe loader, device-agnostic init and resume.

    Only attributes of the in-memory ``basicsr.utils.options`` and
    ``basicsr.train`` modules change; nothing on disk.
    """
    import collections

    import basicsr.train as btrain
    import basicsr.utils.options as bopt
    bopt.ordered_yaml = lambda: (SafeOptionLoader, yaml.SafeDumper)
    bopt.init_dist = init_dist_any_device
    install_runner_fixes(btrain)
    from .option_check import install_option_check
    install_option_check()  # the whole option tree checked after parse_options, before anything is made
    btrain.EnlargedSampler = _resumable_sampler_class()
    if not getattr(btrain.build_dataloader, '_yoda_wrapped', False):
        btrain.build_dataloader = _build_dataloader_own_generator(btrain.build_dataloader)
        btrain.build_dataloader._yoda_wrapped = True
    # BasicSR's MultiStepRestartLR keeps its milestones in a Counter; allow it
    # in weights_only loading of resume states (a plain dict subclass, no code).
    torch.serialization.add_safe_globals([collections.Counter])


def run_basicsr_pipeline(phase: str, root_path: str):
    """BasicSR's ``train_pipeline`` / ``test_pipeline`` (``phase`` 'train' or 'test') with our runner fixes.

    A full disk ends with one line and exit code 2 (:mod:`yoda_plugin.utils.disk`); other failures keep their
    traceback. The process group is closed only after success: after a failure on one rank, the others may
    still wait in a collective.
    """
    patch_basicsr_runner()
    if phase == 'train':
        from basicsr.train import train_pipeline as pipeline
    elif phase == 'test':
        from basicsr.test import test_pipeline as pipeline
    else:
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
    try:
        pipeline(root_path)
    except Exception as err:
        from basicsr.utils import get_root_logger

        from yoda_plugin.utils.disk import exit_if_disk_full
        exit_if_disk_full(err, root_path, get_root_logger())
        raise
    close_process_group()
