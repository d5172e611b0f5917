"""``YODAResolver`` on tiny random networks, in-process: odd image sizes, inputs it refuses, and what it needs.

Both backbones are built from option dicts the way the inference API builds them; no test run, no subprocess
except the one that proves the resolver needs no training class.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_env, tiny_options, write_options

from yoda_plugin import YODAResolver
from yoda_plugin.archs import build_network

SRDIFF_NET = {'type': 'SRDiffNet', 'scale': 4, 'rrdb_num_feat': 8, 'rrdb_num_block': 2, 'rrdb_num_grow_ch': 4,
              'base_channels': 8, 'channel_mults': [1, 2], 'num_res_blocks': 1}
BACKBONES = ('sr3', 'srdiff')

pytestmark = pytest.mark.usefixtures('one_thread')


def options(backbone: str, yoda: bool = True) -> dict:
    opt = tiny_options('/nonexistent', yoda=yoda)  # the datasets are only read for resize and attention_meta
    if backbone == 'srdiff':
        opt.update(model_type='SRDiffModel', network_g=dict(SRDIFF_NET),
                   diffusion={'schedule': 'cosine', 'num_timesteps': 20, 'sample_steps': 2})
    opt['diffusion']['sample_steps'] = 2
    return opt


def resolver(backbone: str, yoda: bool = True) -> YODAResolver:
    torch.manual_seed(0)
    opt = options(backbone, yoda)
    return YODAResolver.from_network(build_network(opt), opt, device='cpu', sampler={'type': 'ddim', 'steps': 2})


@pytest.fixture(scope='module', params=BACKBONES)
def yoda_resolver(request):
    return resolver(request.param)


@pytest.mark.parametrize('size', [(1, 1), (1, 5), (5, 1)])
def test_lr_images_with_a_side_of_one_pixel(yoda_resolver, size):
    lr = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = yoda_resolver(lr, seed=0)  # the attention map is computed on the LR image: (1, 5), not squeezed to (5,)
    assert out.shape == (4 * size[0], 4 * size[1], 3) and out.dtype == np.uint8
    given = yoda_resolver(lr, attention=np.full(size, 0.5, np.float32), seed=0)  # an LR-grid map given
    assert given.shape == out.shape
    batched = yoda_resolver(lr, attention=torch.full((1, 1, *size), 0.5), seed=0)  # (1, 1, h, w) is one map
    assert np.array_equal(batched, given)


@pytest.mark.parametrize('grid', ['lr', 'hr'])
@pytest.mark.parametrize('bad', [np.float32(1.5), np.float32(-0.5), np.uint8(200)], ids=['1.5', '-0.5', 'uint8-200'])
def test_attention_outside_the_unit_range_is_refused_on_both_grids(yoda_resolver, grid, bad):
    lr = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    shape = (4, 6) if grid == 'lr' else (16, 24)
    amap = np.full(shape, 0.5, np.float32).astype(type(bad))
    amap[1, 2] = bad
    with pytest.raises(ValueError) as err:
        yoda_resolver(lr, attention=amap)
    assert '[0, 1]' in str(err.value) and f'{float(bad):.4g}' in str(err.value)


def test_float_tensor_of_0_to_255_is_refused():
    sr = resolver('sr3', yoda=False)
    image = torch.rand(1, 3, 4, 6) * 255
    with pytest.raises(ValueError) as err:
        sr(image)
    assert '[0, 1]' in str(err.value) and 'max 2' in str(err.value)  # the maximum found, e.g. 254.6
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        sr(torch.full((3, 4, 6), -0.5))
    assert sr(image / 255).shape == (1, 3, 16, 24)  # the same image in [0, 1] is accepted


def test_the_resolver_needs_no_training_class(tmp_path):
    """With every ``yoda_plugin.models`` module made unimportable, an option file still builds a working resolver
    for both backbones: inference reads its options through ``yoda_plugin.config``."""
    ckpts = {}
    for backbone in BACKBONES:
        opt = options(backbone)
        torch.manual_seed(0)
        net = build_network(opt)
        ckpt = str(tmp_path / f'{backbone}.pth')
        torch.save({'params_ema': net.state_dict()}, ckpt)
        ckpts[backbone] = (write_options(tmp_path / f'{backbone}.yml', opt), ckpt)
    code = f'''
import sys
import numpy as np
import yoda_plugin  # registers the archs, datasets and models with BasicSR, as an option file does
for name in [m for m in sys.modules if m == 'yoda_plugin.models' or m.startswith('yoda_plugin.models.')]:
    sys.modules[name] = None  # from here on, importing any of them fails
delattr(yoda_plugin, 'models')
from yoda_plugin import YODAResolver
for opt, ckpt in {list(ckpts.values())!r}:
    sr = YODAResolver.from_options(opt, ckpt, device='cpu', sampler={{'type': 'ddim', 'steps': 2}})
    out = sr(np.zeros((4, 4, 3), np.uint8), attention=np.full((4, 4), 0.5, np.float32))
    assert out.shape == (16, 16, 3), out.shape
print('ok')
'''
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


def test_a_negative_tile_size_is_named_as_such(capsys):
    from conftest import load_script

    from yoda_plugin.config import build_pipeline
    script = load_script('inference_yoda.py')
    for flag in ('--tile', '--tile-overlap'):
        with pytest.raises(SystemExit) as err:
            script.build_parser().parse_args(['in.png', '-o', 'out', '--opt', 'o.yml', flag, '-8'])
        message = capsys.readouterr().err
        assert err.value.code == 2 and f'argument {flag}:' in message and '-8' in message
    opt = options('sr3')
    net = build_network(opt)
    for tiling, named in (({'tile_size': -8}, 'tile_size'), ({'tile_size': 2}, 'tile_size 2'),
                          ({'tile_size': 16, 'tile_overlap': -4}, 'tile_overlap')):
        with pytest.raises(ValueError) as err:
            build_pipeline(net, opt, tiling={**tiling, 'round': True})
        assert named in str(err.value) and (named == 'tile_overlap' or 'tile_overlap' not in str(err.value))
    assert build_pipeline(net, opt, tiling={'tile_size': 17, 'round': True}).tiling.tile_size == 16
