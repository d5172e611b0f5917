"""Process groups for the runners on any device: NCCL with CUDA, gloo without."""
import atexit
import os
import sys

import torch


def init_dist_any_device(launcher: str, backend=None, **kwargs):
    """BasicSR's ``init_dist`` for CUDA *and* CPU.

    BasicSR's pytorch launcher hard-codes NCCL and ``torch.cuda.set_device``
    (a ZeroDivisionError without GPUs). We pick NCCL with CUDA and gloo
    without, reading RANK/WORLD_SIZE/LOCAL_RANK that torchrun sets. The group
    is closed when the interpreter exits normally
    (:func:`close_process_group_at_exit`): BasicSR's own ``train.py`` never
    closes it.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    if launcher not in ('slurm', 'pytorch'):
        raise ValueError(f'unknown launcher {launcher!r}; use none, pytorch or slurm')
    atexit.register(close_process_group_at_exit)
    if launcher == 'slurm':
        from basicsr.utils.dist_util import init_dist
        return init_dist(launcher, backend=backend or 'nccl', **kwargs)
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


def close_process_group_at_exit():
    """:func:`close_process_group` unless the interpreter is exiting on an uncaught exception.

    After a failure the other ranks may still be inside a collective with this
    one, and closing could block this process until gloo's timeout; torchrun
    stops the other ranks instead. (An uncaught exception sets ``sys.last_value``
    before ``atexit`` handlers run.)
    """
    if getattr(sys, 'last_value', None) is None:
        close_process_group()
