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


def load_resume_state_any_device(opt):
    """BasicSR's ``load_resume_state`` without its CUDA assumption, and picky about completeness.

    With ``--auto_resume`` it takes the newest ``<iter>.state`` whose weights
    ``net_g_<iter>.pth`` also exist (states are written after the weights,
    both atomically, so that pair is complete). Loaded with ``weights_only=True``
    onto the GPU when there is one, else the CPU.
    """
    from basicsr.utils import get_root_logger
    from basicsr.utils import check_resume
    path = None
    if opt.get('auto_resume'):
        state_dir = opt['path'].get('training_states') or os.path.join('experiments', opt['name'], 'training_states')
        model_dir = opt['path'].get('models') or os.path.join('experiments', opt['name'], 'models')
        if os.path.isdir(state_dir):
            iters = sorted((int(f[:-len('.state')]) for f in os.listdir(state_dir)
                            if f.endswith('.state') and f[:-len('.state')].isdigit()), reverse=True)
            for it in iters:
                if os.path.isfile(os.path.join(model_dir, f'net_g_{it}.pth')):
                    path = os.path.join(state_dir, f'{it}.state')
                    break
                get_root_logger().warning(f'auto_resume: skipping {it}.state, its net_g_{it}.pth is missing')
        if path is not None:
            opt['path']['resume_state'] = path
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
    if path is None:
        return None
    if torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise RuntimeError(f'cannot load the training state {path}: {err}') from err
    check_resume(opt, state['iter'])
    train_opt = (opt.get('datasets') or {}).get('train') or {}
    _PENDING_RESUME.update(epoch=int(state['epoch']), iter=int(state['iter']),
                           batch_size=int(train_opt.get('batch_size_per_gpu', 1)))
    return state


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
    btrain.load_resume_state = load_resume_state_any_device
    btrain.EnlargedSampler = _resumable_sampler_class()
    if not getattr(btrain.build_dataloader, '_yoda_wrapped', False):
        btrain.build_dataloader = _build_dataloader_own_generator(btrain.build_dataloader)
        btrain.build_dataloader._yoda_wrapped = True
    # BasicSR's MultiStepRestartLR keeps its milestones in a Counter; allow it
    # in weights_only loading of resume states (a plain dict subclass, no code).
    torch.serialization.add_safe_globals([collections.Counter])
