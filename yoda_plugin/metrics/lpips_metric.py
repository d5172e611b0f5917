"""LPIPS (Zhang et al. 2018) as a BasicSR metric: ``calculate_lpips``.

The paper reports LPIPS with the AlexNet trunk (Tables 1-3). The ``lpips``
package ships its calibrated linear layers (``lpips/weights/v0.1/alex.pth``),
but its AlexNet trunk comes from torchvision's ImageNet weights, which
torchvision would download on first use. We never download anything: the
trunk is built randomly initialised and then loaded from a local copy of
torchvision's official file ``alexnet-owt-7be5be79.pth``, found in this order:

1. the ``weights`` argument (option ``val.metrics.<name>.weights``): a file, or
   a folder holding the official file name;
2. the environment variable ``YODA_LPIPS_ALEXNET`` (file or folder);
3. torch hub's checkpoint folder, ``<torch.hub.get_dir()>/checkpoints/``, where
   ``torchvision.models.alexnet(weights='IMAGENET1K_V1')`` stores the file.

A missing file is an error naming the file, every place looked at and how to
get it. Every file is loaded with ``torch.load(weights_only=True)`` and must fit
exactly (no missing or unexpected trunk keys). Models are cached per (device,
trunk file, linear-layer file), so validation builds one model per run.

Usage in an option file::

    val:
      metrics:
        lpips: {type: calculate_lpips, crop_border: 0}            # + weights: /path/alexnet-owt-7be5be79.pth
"""
import os
import threading
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from basicsr.utils.registry import METRIC_REGISTRY

ALEXNET_FILE = 'alexnet-owt-7be5be79.pth'
ALEXNET_ENV = 'YODA_LPIPS_ALEXNET'
SUPPORTED_NETS = ('alex', )
# Slices of lpips' AlexNet trunk: which torchvision ``features.<i>`` layer lives in which ``slice<n>``.
_ALEX_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}

_CACHE: Dict[Tuple[str, str, str, str], torch.nn.Module] = {}
_LOCK = threading.Lock()


def _hub_path(file_name: str = ALEXNET_FILE) -> str:
    return os.path.join(torch.hub.get_dir(), 'checkpoints', file_name)


def resolve_alexnet_weights(weights: Optional[str] = None) -> str:
    """Local path of torchvision's AlexNet ImageNet weights; FileNotFoundError (with help) if absent."""
    looked = []

    def candidate(path: str) -> str:
        path = os.path.expanduser(os.fspath(path))
        return os.path.join(path, ALEXNET_FILE) if os.path.isdir(path) else path

    if weights is not None:
        path = candidate(weights)
        if os.path.isfile(path):
            return path
        looked.append(f'weights= option: {path} (no such file; an explicit path is used as given, nothing else '
                      'was consulted)')
        raise _not_found(looked)
    looked.append('weights= option: not given')
    env = os.environ.get(ALEXNET_ENV, '').strip()
    if env:
        path = candidate(env)
        if os.path.isfile(path):
            return path
        looked.append(f'environment variable {ALEXNET_ENV}={env!r}: {path} (no such file; when set it must point '
                      'to the weights, so the torch hub folder was not consulted)')
        raise _not_found(looked)
    looked.append(f'environment variable {ALEXNET_ENV}: not set')
    hub = _hub_path()
    if os.path.isfile(hub):
        return hub
    looked.append(f'torch hub checkpoint folder: {hub} (no such file)')
    raise _not_found(looked)


def _not_found(looked) -> FileNotFoundError:
    places = '\n'.join(f'  {i}. {p}' for i, p in enumerate(looked, 1))
    return FileNotFoundError(
        f'LPIPS needs the AlexNet ImageNet weights of torchvision, file {ALEXNET_FILE!r}, and nothing is ever '
        f'downloaded. Looked in, in this order:\n{places}\n'
        f'Get the file from torchvision\'s model zoo (https://download.pytorch.org/models/{ALEXNET_FILE}), or run '
        f'once on a machine with internet: python -c "import torchvision; '
        f'torchvision.models.alexnet(weights=\'IMAGENET1K_V1\')" (it lands in '
        f'~/.cache/torch/hub/checkpoints/). Then pass weights=<path> in the metric options, set '
        f'{ALEXNET_ENV}=<path>, or copy it to {os.path.dirname(_hub_path())}.')


def _load_state(path: str, what: str) -> dict:
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # corrupt, foreign or unsafe (weights_only refuses code) files
        raise ValueError(f'cannot load {what} from {path} with torch.load(weights_only=True): '
                         f'{type(err).__name__}: {err}') from err
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise ValueError(f'{what} file {path} must hold a state dict, got {type(state).__name__}')
    return {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}


def _alexnet_trunk_state(state: dict, path: str) -> dict:
    """torchvision AlexNet keys (``features.<i>.*``) -> lpips trunk keys (``net.slice<n>.<i>.*``)."""
    out, unexpected = {}, []
    for key, value in state.items():
        parts = key.split('.')
        if parts[0] == 'classifier':
            continue  # the classifier head is not part of LPIPS
        if parts[0] != 'features' or len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in _ALEX_SLICES:
            unexpected.append(key)
            continue
        out[f'net.slice{_ALEX_SLICES[int(parts[1])]}.{parts[1]}.{parts[2]}'] = value
    if unexpected:
        raise ValueError(f'{path} is not torchvision\'s AlexNet state dict: unexpected key(s) {unexpected[:6]} '
                         f'(expected features.<i>.weight/bias and classifier.*)')
    return out


def _load_exact(module: torch.nn.Module, state: dict, prefix: str, path: str, what: str) -> None:
    # ``lins.<i>`` aliases ``lin<i>`` in lpips.LPIPS (same modules, two names): check the ``lin<i>`` names.
    expected = {k: v for k, v in module.state_dict().items() if k.startswith(prefix) and not k.startswith('lins.')}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f'{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})' for k in expected
             if k in state and (not torch.is_tensor(state[k]) or state[k].shape != expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f'{what} in {path} does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}, '
                         f'wrong shape {wrong[:4]}. Refusing to compute LPIPS with random weights.')
    module.load_state_dict(state, strict=False)


def default_lpips_weights(net: str = 'alex', version: str = '0.1') -> str:
    """The linear-layer weights that ship inside the ``lpips`` package."""
    import lpips
    return os.path.join(os.path.dirname(lpips.__file__), 'weights', f'v{version}', f'{net}.pth')


def get_lpips_model(net: str = 'alex', weights: Optional[str] = None, lpips_weights: Optional[str] = None,
                    device=None) -> torch.nn.Module:
    """A cached, eval-mode ``lpips.LPIPS`` with local trunk and linear-layer weights (see module docstring)."""
    if net not in SUPPORTED_NETS:
        raise ValueError(f'LPIPS net {net!r} is not supported: the paper uses AlexNet, net=\'alex\'')
    device = torch.device(device if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu'))
    trunk_path = os.path.realpath(resolve_alexnet_weights(weights))
    lin_path = os.path.realpath(os.path.expanduser(lpips_weights) if lpips_weights else default_lpips_weights(net))
    if not os.path.isfile(lin_path):
        raise FileNotFoundError(f'LPIPS linear-layer weights not found: {lin_path} (they ship with the lpips '
                                'package as lpips/weights/v0.1/alex.pth; pass lpips_weights=<path> otherwise)')
    key = (str(device), net, trunk_path, lin_path)
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _build(net, trunk_path, lin_path).to(device)
            _CACHE[key] = model
    return model


def _build(net: str, trunk_path: str, lin_path: str) -> torch.nn.Module:
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torchvision's deprecation notice for ``pretrained=False``
        # pretrained=False: no linear weights loaded by lpips itself; pnet_rand=True: random trunk, no download.
        model = lpips.LPIPS(pretrained=False, net=net, version='0.1', pnet_rand=True, verbose=False)
    _load_exact(model, _alexnet_trunk_state(_load_state(trunk_path, 'AlexNet weights'), trunk_path), 'net.',
                trunk_path, 'AlexNet trunk')
    _load_exact(model, _load_state(lin_path, 'LPIPS linear layers'), 'lin', lin_path, 'LPIPS linear layers')
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def lpips_tensor(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """LPIPS per image for RGB batches (B, 3, H, W) in [0, 1]: a (B,) tensor."""
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f'LPIPS needs two RGB batches of equal shape (B, 3, H, W), got {tuple(x.shape)} and '
                         f'{tuple(y.shape)}')
    dev = next(model.parameters()).device
    out = model(x.to(dev, torch.float32) * 2 - 1, y.to(dev, torch.float32) * 2 - 1)
    return out.view(-1).cpu()


def _to_tensor(img: np.ndarray, input_order: str, name: str) -> torch.Tensor:
    img = np.asarray(img)
    if input_order == 'CHW':
        img = img.transpose(1, 2, 0)
    elif input_order != 'HWC':
        raise ValueError(f'input_order must be HWC or CHW, got {input_order!r}')
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'LPIPS needs 3-channel BGR images, {name} has shape {img.shape}')
    if img.dtype == np.uint8:
        arr = img.astype(np.float32) / 255.0
    else:
        arr = img.astype(np.float32)
        if arr.max() > 1.0 + 1e-6:  # BasicSR's float images in [0, 255]
            arr = arr / 255.0
    arr = arr[:, :, ::-1]  # BGR (BasicSR / cv2) -> RGB
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


@METRIC_REGISTRY.register()
def calculate_lpips(img, img2, crop_border=0, input_order='HWC', net='alex', weights=None, lpips_weights=None,
                    device=None, **kwargs):
    """LPIPS (AlexNet, v0.1) between two BasicSR images (uint8 HWC BGR, as calculate_psnr); lower is better.

    Args:
        crop_border: pixels cut off each border before comparing.
        weights: torchvision's ``alexnet-owt-7be5be79.pth`` (file or folder); see the module docstring.
        lpips_weights: linear-layer weights (default: those shipped with the lpips package).
        device: torch device (default: CUDA when available).
    ``test_y_channel: false`` is accepted for symmetry with PSNR/SSIM; other keys are errors.
    """
    if kwargs.get('test_y_channel'):
        raise ValueError('calculate_lpips works on RGB images; test_y_channel: true is not supported')
    unknown = sorted(set(kwargs) - {'test_y_channel'})
    if unknown:
        raise TypeError(f'calculate_lpips got unknown option(s) {unknown}; known: crop_border, input_order, net, '
                        'weights, lpips_weights, device')
    if np.shape(img) != np.shape(img2):
        raise ValueError(f'Image shapes are different: {np.shape(img)}, {np.shape(img2)}.')
    a, b = _to_tensor(img, input_order, 'img'), _to_tensor(img2, input_order, 'img2')
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    model = get_lpips_model(net, weights, lpips_weights, device)
    return float(lpips_tensor(a, b, model)[0])
