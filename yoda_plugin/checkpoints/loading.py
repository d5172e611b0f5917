"""Loading weights into a built network: BasicSR checkpoints and the published SR3 / SRDiff files.

:func:`load_network_weights` is what the BasicSR models (``load_network``) and
the inference API use; it recognises the published layouts of
:mod:`.public` and maps them onto the network.
"""
import os
from collections import OrderedDict

import torch
from basicsr.utils import get_root_logger

from ..utils.torch_io import load_checkpoint
from .public import FORMATS, detect_format, fit_network, missing_published_weights


def _strip_module(state) -> OrderedDict:
    return OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in state.items())


# A non-strict load that fills less than this share of the network's tensors is refused: it is a wrong file.
MIN_LOADED_SHARE = 0.5


def load_network_weights(net, load_path: str, param_key='params', strict: bool = True, trusted: bool = False,
                         loaded=None):
    """Load a BasicSR checkpoint (``{"params": ..., "params_ema": ...}``) into ``net``, with errors that say why not.

    ``param_key`` missing falls back to ``params``; ``trusted`` loads with ``weights_only=False``; not ``strict``
    skips keys the network lacks or holds in another shape, listing each in a warning, and refuses a file that
    fills less than half of the network's tensors. The published SR3 (Janspiry) and SRDiff files are recognised
    and mapped onto ``net`` (:mod:`yoda_plugin.checkpoints`); ``param_key`` does not apply to them. A missing
    published file gets an error saying where it is published and how to convert it. ``loaded``: the file's
    content when the caller has already loaded it (``load_path`` then only names it).
    """
    if loaded is None and not os.path.isfile(load_path):
        raise missing_published_weights(load_path) or FileNotFoundError(f'checkpoint not found: {load_path}')
    state = load_checkpoint(load_path, weights_only=not trusted) if loaded is None else loaded
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
