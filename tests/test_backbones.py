"""Backbones are registered objects: the registry, the lookups that replace name comparisons, and the worked
example of ``docs/architecture.md`` (an arch, an adapter and a model class) trained, validated and served."""
import os
import re

import numpy as np
import pytest
import torch

from conftest import REPO

from yoda_plugin.core import (BACKBONES, NetworkAdapter, SR3Adapter, SRDiffAdapter, backbone_for_model_type,
                              get_backbone, register_backbone)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_the_registry_names_each_backbone_and_its_model():
    assert BACKBONES['sr3'] is SR3Adapter and BACKBONES['srdiff'] is SRDiffAdapter
    assert get_backbone('srdiff') is SRDiffAdapter and get_backbone(SR3Adapter) is SR3Adapter
    assert backbone_for_model_type('SRDiffModel') is SRDiffAdapter
    with pytest.raises(ValueError) as err:
        get_backbone('sr4')
    assert "'sr4'" in str(err.value) and 'sr3' in str(err.value)
    with pytest.raises(ValueError) as err:
        backbone_for_model_type('SRModel')
    assert "'SRModel'" in str(err.value) and 'SR3Model' in str(err.value) and 'SRDiffModel' in str(err.value)
    with pytest.raises(ValueError, match='already registered'):
        register_backbone(type('Other', (NetworkAdapter, ), {'name': 'sr3'}))


def test_no_library_module_compares_backbone_names():
    """DiffusionSR, the config, the models, inference and checkpoint loading look backbones up."""
    pattern = re.compile(r"""(backbone|model_type)['"]?\)?\s*[!=]=\s*['"]"""  # backbone == 'sr3'
                         r"""|[!=]=\s*['"](sr3|srdiff|SR3Model|SRDiffModel)['"]""")  # ... == 'SRDiffModel'
    for folder, _, files in os.walk(os.path.join(REPO, 'yoda_plugin')):
        for name in files:
            if name.endswith('.py') and 'apps' not in folder:
                text = open(os.path.join(folder, name), encoding='utf-8').read()
                assert not pattern.search(text), f'{name}: {pattern.search(text).group(0)}'


def documented_example() -> str:
    """The first Python block after the "Adding a backbone" heading of docs/architecture.md."""
    text = open(os.path.join(REPO, 'docs', 'architecture.md'), encoding='utf-8').read()
    section = text[text.index('### Adding a backbone'):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.fixture(scope='module')
def tiny_backbone():
    from basicsr.utils.registry import ARCH_REGISTRY
    if 'TinyUNet' not in ARCH_REGISTRY:  # BasicSR's registries refuse a second registration
        exec(compile(documented_example(), 'docs/architecture.md', 'exec'), {'__name__': 'tiny_backbone'})
    return {'model_type': 'TinyModel', 'scale': 4, 'network_g': {'type': 'TinyUNet', 'channels': 8,
                                                                 'num_timesteps': 50},
            'diffusion': {'schedule': 'linear', 'num_timesteps': 50, 'linear_start': 1e-4, 'linear_end': 0.1,
                          'sample_steps': 3},
            'yoda': {'enabled': True, 'lower_bound': 0.3}}


def test_the_documented_backbone_trains_validates_and_serves(tiny_backbone):
    from yoda_plugin import YODAResolver
    from yoda_plugin.apps.training_step import synthetic_batch, training_model
    opt = tiny_backbone
    assert backbone_for_model_type('TinyModel').name == 'tiny'
    torch.manual_seed(0)
    model = training_model(opt, 'cpu')
    data = synthetic_batch(opt, 2, 'cpu', size=12)
    model.feed_data(data)
    before = [p.detach().clone() for p in model.net_g.parameters()]
    model.optimize_parameters(1)
    assert np.isfinite(model.log_dict['l_pix'])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net_g.parameters()))
    out = model.sample(seed=0)  # the model's pipeline: YODA blend, sampler, padding to the size multiple
    assert out.shape == data['gt'].shape and 0 <= float(out.min()) and float(out.max()) <= 1
    resolver = YODAResolver.from_network(model.net_g, opt, sampler={'type': 'ddim', 'steps': 2},
                                         tiling={'tile_size': 8, 'tile_overlap': 2})
    sr = resolver(np.zeros((3, 5, 3), np.uint8), attention=np.full((3, 5), 0.5, np.float32))  # odd size: padded
    assert sr.shape == (12, 20, 3) and resolver.last_info['tiles'] > 1
