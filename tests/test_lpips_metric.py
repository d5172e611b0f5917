"""LPIPS metric: local weights only (random AlexNet in torchvision's layout), BasicSR registry, properties."""
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, mentions, run_env

import yoda_plugin  # noqa: F401
from yoda_plugin.metrics import lpips_metric
from yoda_plugin.metrics.lpips_metric import ALEXNET_ENV, ALEXNET_FILE, calculate_lpips


def random_alexnet_file(folder):
    """A randomly initialised torchvision AlexNet (fixed seed) saved under the official file name."""
    import torchvision
    torch.manual_seed(0)
    path = os.path.join(str(folder), ALEXNET_FILE)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope='session')
def alexnet_file(tmp_path_factory):
    return random_alexnet_file(tmp_path_factory.mktemp('alexnet'))


@pytest.fixture
def no_lookup(monkeypatch, tmp_path):
    """No env var and an empty torch hub folder, so only explicit weights count."""
    monkeypatch.delenv(ALEXNET_ENV, raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    return tmp_path / 'hub'


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, (xx * yy)], 2) * 200 + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_properties(alexnet_file, no_lookup):
    img = _image()
    assert calculate_lpips(img, img, weights=alexnet_file) == 0.0
    rng = np.random.default_rng(1)
    values = []
    for sigma in (4, 16, 48):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        ab, ba = calculate_lpips(img, noisy, weights=alexnet_file), calculate_lpips(noisy, img, weights=alexnet_file)
        assert ab > 0 and abs(ab - ba) <= 1e-6 * max(ab, 1)
        values.append(ab)
    assert values[0] < values[1] < values[2], values
    cropped = calculate_lpips(img, noisy, crop_border=4, weights=alexnet_file)
    assert cropped > 0 and cropped != values[-1]


def test_registered_and_cached(alexnet_file, no_lookup):
    from basicsr.metrics import calculate_metric
    from basicsr.utils.registry import METRIC_REGISTRY
    assert 'calculate_lpips' in METRIC_REGISTRY
    img, other = _image(0), _image(1)
    opt = {'type': 'calculate_lpips', 'crop_border': 0, 'net': 'alex', 'weights': alexnet_file}
    v1 = calculate_metric({'img': img, 'img2': other}, opt)
    m1 = lpips_metric.get_lpips_model('alex', alexnet_file, device='cpu')
    v2 = calculate_metric({'img': img, 'img2': other}, opt)
    assert v1 == v2 > 0 and opt['type'] == 'calculate_lpips'  # BasicSR must not have consumed the option
    assert lpips_metric.get_lpips_model('alex', os.path.dirname(alexnet_file), device='cpu') is m1  # folder = file


def test_lookup_order_env_and_hub(alexnet_file, no_lookup, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        lpips_metric.resolve_alexnet_weights()
    msg = str(info.value)
    assert ALEXNET_FILE in msg and ALEXNET_ENV in msg and str(no_lookup) in msg and 'IMAGENET1K_V1' in msg
    hub_file = no_lookup / 'checkpoints' / ALEXNET_FILE
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(open(alexnet_file, 'rb').read())
    assert lpips_metric.resolve_alexnet_weights() == str(hub_file)
    monkeypatch.setenv(ALEXNET_ENV, alexnet_file)
    assert lpips_metric.resolve_alexnet_weights() == alexnet_file  # env var before hub
    monkeypatch.setenv(ALEXNET_ENV, str(no_lookup / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        lpips_metric.resolve_alexnet_weights()  # a set variable must be right: no silent fallback
    with pytest.raises(FileNotFoundError, match=mentions('nope.pth', 'weights=', 'nothing else')):
        lpips_metric.resolve_alexnet_weights(str(no_lookup / 'nope.pth'))


def test_wrong_files_are_refused(tmp_path, no_lookup):
    bad = tmp_path / 'bad.pth'
    torch.save({'conv.weight': torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match='not torchvision'):
        calculate_lpips(_image(), _image(1), weights=str(bad))
    partial = tmp_path / 'partial.pth'
    import torchvision
    sd = torchvision.models.alexnet(weights=None).state_dict()
    del sd['features.10.weight']
    torch.save(sd, partial)
    with pytest.raises(ValueError, match='features.10|slice5.10'):
        calculate_lpips(_image(), _image(1), weights=str(partial))
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='weights_only=True'):
        calculate_lpips(_image(), _image(1), weights=str(junk))


def test_option_errors(alexnet_file):
    img = _image()
    with pytest.raises(TypeError, match='unknown option'):
        calculate_lpips(img, img, weights=alexnet_file, weight=1)
    with pytest.raises(ValueError, match='test_y_channel'):
        calculate_lpips(img, img, weights=alexnet_file, test_y_channel=True)
    with pytest.raises(ValueError, match='not supported'):
        calculate_lpips(img, img, weights=alexnet_file, net='vgg')
    with pytest.raises(ValueError, match='shapes'):
        calculate_lpips(img, img[:32], weights=alexnet_file)


@pytest.mark.slow
def test_inference_without_lpips_weights_leaves_no_temporary_folder(tiny_data, tmp_path):
    import cv2
    import numpy as np
    from basicsr.utils.registry import ARCH_REGISTRY

    from conftest import tiny_options, write_options
    opt = tiny_options(tiny_data, name='inf')
    opt['val']['metrics']['lpips'] = {'type': 'calculate_lpips', 'crop_border': 0, 'net': 'alex'}
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, tmp_path / 'net.pth')
    opt['path']['pretrain_network_g'] = str(tmp_path / 'net.pth')
    opt_path = write_options(tmp_path / 'inf.yml', opt)
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    temp = tmp_path / 'temp'
    temp.mkdir()
    env = dict(run_env(), TMPDIR=str(temp), YODA_LPIPS_ALEXNET=str(tmp_path / 'absent_alexnet.pth'))
    proc = subprocess.run([PYTHON, os.path.join(REPO, 'scripts', 'inference_yoda.py'), str(tmp_path / 'in'), '-o',
                           str(tmp_path / 'out'), '--opt', opt_path, '--steps', '2', '--quiet'],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path / 'out') == ['a.png']
    assert os.listdir(temp) == [], 'no temporary folder is left behind'
