"""DINO attention sources (yoda_plugin.attention.dino) with randomly initialised weights.

No pretrained weights exist on the test machines: every test builds seeded random networks, saves them in
DINO's official layouts (released backbone file and training checkpoint) and loads them back through the
real lookup and loading code.
"""
import argparse
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import mentions
from yoda_plugin.attention import ATTENTION_SOURCES, build_attention_source, build_attention_source_from_config
from yoda_plugin.attention.dino import (OFFICIAL_WEIGHTS, WEIGHTS_ENV_VARS, DinoResNet50Attention, DinoViTS8Attention,
                                        UnsafeCheckpointError, aggregate_heads, extract_backbone_state_dict,
                                        load_checkpoint, minmax_normalize, network_input_size, resnet50_backbone,
                                        resolve_weights, tile_windows, vit_small_patch8)

VIT_FILE = OFFICIAL_WEIGHTS['dino_vits8']
RESNET_FILE = OFFICIAL_WEIGHTS['dino_resnet50']
SOURCES = {'dino_vits8': DinoViTS8Attention, 'dino_resnet50': DinoResNet50Attention}


class NotATensor:
    """A custom class: pickling an instance makes a checkpoint that needs unsafe unpickling."""

    def __init__(self):
        self.payload = 'anything'


# --------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------


def _training_checkpoint(state_dict, prefix='module.backbone.'):
    """A DINO training checkpoint: teacher/student with wrapper prefixes, a projection head, args, epoch."""
    teacher = {prefix + k: v for k, v in state_dict.items()}
    teacher[prefix.replace('backbone.', '') + 'head.mlp.0.weight'] = torch.randn(8, 4)
    teacher[prefix.replace('backbone.', '') + 'head.last_layer.weight_g'] = torch.ones(16, 1)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}  # must NOT be the one that is loaded
    return {'teacher': teacher, 'student': student, 'epoch': 100, 'dino_loss': {'center': torch.zeros(1, 16)},
            'args': argparse.Namespace(arch='test', patch_size=8, lr=0.0005, output_dir='/tmp/x')}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """Seeded random ViT-S/8 and ResNet-50 saved as official files and as training checkpoints."""
    root = tmp_path_factory.mktemp('dino_weights')
    torch.manual_seed(0)
    vit_state = {k: v.clone() for k, v in vit_small_patch8().state_dict().items()}
    resnet = resnet50_backbone()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that they are checked too
        for name, buf in resnet.named_buffers():
            if name.endswith('running_mean'):
                buf.normal_(0.0, 0.1)
            elif name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
    resnet_state = {k: v.clone() for k, v in resnet.state_dict().items()}
    files = {}
    for source, state, file_name in (('dino_vits8', vit_state, VIT_FILE), ('dino_resnet50', resnet_state,
                                                                          RESNET_FILE)):
        plain_dir = root / source / 'plain'
        plain_dir.mkdir(parents=True)
        torch.save(state, plain_dir / file_name)
        torch.save(_training_checkpoint(state), root / source / 'train_checkpoint.pth')
        files[source] = {'dir': plain_dir, 'plain': plain_dir / file_name,
                         'train': root / source / 'train_checkpoint.pth'}
    return {'dino_vits8': vit_state, 'dino_resnet50': resnet_state, 'files': files, 'root': root}


@pytest.fixture(autouse=True)
def isolated_lookup(monkeypatch, tmp_path):
    """No env var and an empty torch hub folder, so that files on the developer's machine do not interfere."""
    for var in WEIGHTS_ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.hub, '_hub_dir', torch.hub._hub_dir)  # restored after the test
    empty_hub = tmp_path / 'empty_hub'
    empty_hub.mkdir()
    torch.hub.set_dir(str(empty_hub))
    return empty_hub


@pytest.fixture(scope='module')
def vit_source(weights):
    return DinoViTS8Attention(weights=str(weights['files']['dino_vits8']['plain']), input_size=64)


@pytest.fixture(scope='module')
def resnet_source(weights):
    return DinoResNet50Attention(weights=str(weights['files']['dino_resnet50']['plain']), input_size=64)


def _assert_state_equal(model, expected):
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key].cpu(), value), key


def _image(h, w, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = rng.random((h, w, 3))
    img[h // 4:h // 2, w // 4:w // 2] = 1.0  # some structure
    return (img * 255).round().astype(np.uint8) if dtype == np.uint8 else img.astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# network layout
# --------------------------------------------------------------------------------------------------------------


def test_vit_small_patch8_matches_dino_key_layout():
    model = vit_small_patch8()
    state = model.state_dict()
    expected = {'cls_token': (1, 1, 384), 'pos_embed': (1, 1 + 28 * 28, 384), 'patch_embed.proj.weight': (384, 3, 8, 8),
                'patch_embed.proj.bias': (384, ), 'norm.weight': (384, ), 'norm.bias': (384, )}
    for i in range(12):
        p = f'blocks.{i}.'
        expected.update({
            p + 'norm1.weight': (384, ), p + 'norm1.bias': (384, ), p + 'attn.qkv.weight': (1152, 384),
            p + 'attn.qkv.bias': (1152, ), p + 'attn.proj.weight': (384, 384), p + 'attn.proj.bias': (384, ),
            p + 'norm2.weight': (384, ), p + 'norm2.bias': (384, ), p + 'mlp.fc1.weight': (1536, 384),
            p + 'mlp.fc1.bias': (1536, ), p + 'mlp.fc2.weight': (384, 1536), p + 'mlp.fc2.bias': (384, )
        })
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model.num_heads == 6 and model.patch_size == 8


def test_resnet50_backbone_has_torchvision_keys_without_fc():
    keys = set(resnet50_backbone().state_dict())
    assert not any(k.startswith('fc.') for k in keys)
    assert {'conv1.weight', 'bn1.running_var', 'layer4.2.conv3.weight', 'layer1.0.downsample.0.weight'} <= keys


def test_last_selfattention_rows_sum_to_one_and_pos_embed_interpolation():
    torch.manual_seed(1)
    model = vit_small_patch8().eval()
    assert model.interpolate_pos_encoding(28, 28) is model.pos_embed
    pos = model.interpolate_pos_encoding(8, 6)
    assert pos.shape == (1, 1 + 8 * 6, 384)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # the CLS position is kept
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.linspace(-1, 1, 384)  # the same vector at every position ...
    constant = model.pos_embed[:, 1:2].expand(-1, 56 * 40, -1)
    assert torch.allclose(model.interpolate_pos_encoding(56, 40)[:, 1:], constant, atol=1e-5)  # ... stays the same
    with torch.no_grad():
        for x in (torch.rand(2, 3, 64, 48), torch.rand(1, 3, 224, 224)):
            attn = model.get_last_selfattention(x)
            n = 1 + (x.shape[-2] // 8) * (x.shape[-1] // 8)
            assert attn.shape == (x.shape[0], 6, n, n)
            assert torch.all(attn >= 0)
            assert torch.allclose(attn.sum(dim=-1), torch.ones(x.shape[0], 6, n), atol=1e-5)


def test_fused_attention_equals_explicit_softmax():
    torch.manual_seed(2)
    block = vit_small_patch8().blocks[0].eval()
    x = torch.randn(2, 17, 384)
    with torch.no_grad():
        weights = block.attn.attention_weights(x)
        q, k, v = block.attn._qkv(x)
        explicit = block.attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, 384))
        assert torch.allclose(block.attn(x), explicit, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('source', ['dino_vits8', 'dino_resnet50'])
def test_load_plain_file_via_argument_file_and_folder(weights, source):
    files = weights['files'][source]
    for given in (str(files['plain']), files['dir']):  # a file, or a folder holding the official name
        att = SOURCES[source](weights=given)
        assert att.weights_path == str(files['plain'])
        assert not att.model.training and att.device == torch.device('cpu')
        assert not any(p.requires_grad for p in att.model.parameters())
        _assert_state_equal(att.model, weights[source])


@pytest.mark.parametrize('source', ['dino_vits8', 'dino_resnet50'])
def test_load_training_checkpoint_uses_teacher(weights, source):
    att = SOURCES[source](weights=str(weights['files'][source]['train']))
    _assert_state_equal(att.model, weights[source])


def test_load_via_environment_variable(weights, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV_VARS['dino_vits8'], str(weights['files']['dino_vits8']['plain']))
    att = DinoViTS8Attention()
    assert att.weights_path == str(weights['files']['dino_vits8']['plain'])
    _assert_state_equal(att.model, weights['dino_vits8'])
    monkeypatch.setenv(WEIGHTS_ENV_VARS['dino_resnet50'], str(weights['files']['dino_resnet50']['dir']))
    assert DinoResNet50Attention().weights_path == str(weights['files']['dino_resnet50']['plain'])


def test_load_via_torch_hub_checkpoint_folder(weights, tmp_path):
    hub = tmp_path / 'hub'
    (hub / 'checkpoints').mkdir(parents=True)
    shutil.copyfile(weights['files']['dino_resnet50']['plain'], hub / 'checkpoints' / RESNET_FILE)
    torch.hub.set_dir(str(hub))  # the autouse fixture restores the previous hub dir
    att = build_attention_source('dino_resnet50')
    assert att.weights_path == os.path.join(str(hub), 'checkpoints', RESNET_FILE)
    _assert_state_equal(att.model, weights['dino_resnet50'])


def test_training_checkpoint_prefixes_and_head_keys_are_stripped():
    state = {'conv.weight': torch.ones(2)}
    for prefix in ('module.backbone.', 'backbone.', 'module.', ''):
        ckpt = {'teacher': {prefix + 'conv.weight': torch.ones(2), prefix.replace('backbone.', '') + 'head.w': 1}}
        assert extract_backbone_state_dict(ckpt).keys() == state.keys()
    assert extract_backbone_state_dict({'module.conv.weight': torch.ones(2), 'head.x': torch.ones(1)}).keys() == \
        state.keys()
    with pytest.raises(ValueError, match='mapping'):
        extract_backbone_state_dict([torch.ones(1)])


def test_resnet_checkpoint_without_num_batches_tracked_loads(weights, tmp_path):
    state = {k: v for k, v in weights['dino_resnet50'].items() if not k.endswith('num_batches_tracked')}
    path = tmp_path / RESNET_FILE
    torch.save(state, path)
    att = DinoResNet50Attention(weights=str(path))
    for key, value in state.items():
        assert torch.equal(att.model.state_dict()[key], value)


def test_missing_weights_raise_file_not_found_naming_every_place(isolated_lookup):
    for source, cls in SOURCES.items():
        with pytest.raises(FileNotFoundError) as info:
            cls()
        msg = str(info.value)
        assert OFFICIAL_WEIGHTS[source] in msg
        assert WEIGHTS_ENV_VARS[source] in msg
        assert os.path.join(str(isolated_lookup), 'checkpoints') in msg
        assert 'facebookresearch/dino' in msg and 'Pretrained models' in msg
        assert 'weights=' in msg


def test_explicit_or_env_path_that_does_not_exist_raises(tmp_path, monkeypatch, weights):
    missing = tmp_path / 'nowhere' / 'my_dino.pth'
    with pytest.raises(FileNotFoundError, match='my_dino.pth'):
        resolve_weights('dino_vits8', missing)
    # a stale environment variable is an error, not silently replaced by the hub file
    hub = tmp_path / 'hub'
    (hub / 'checkpoints').mkdir(parents=True)
    shutil.copyfile(weights['files']['dino_vits8']['plain'], hub / 'checkpoints' / VIT_FILE)
    torch.hub.set_dir(str(hub))
    assert resolve_weights('dino_vits8') == os.path.join(str(hub), 'checkpoints', VIT_FILE)
    monkeypatch.setenv(WEIGHTS_ENV_VARS['dino_vits8'], str(missing))
    with pytest.raises(FileNotFoundError) as info:
        resolve_weights('dino_vits8')
    assert str(missing) in str(info.value) and WEIGHTS_ENV_VARS['dino_vits8'] in str(info.value)


def test_wrong_keys_raise_value_error_listing_them(weights, tmp_path):
    state = dict(weights['dino_vits8'])
    del state['norm.weight']
    state['blocks.0.attn.extra'] = torch.zeros(3)
    path = tmp_path / 'wrong.pth'
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        DinoViTS8Attention(weights=str(path))
    msg = str(info.value)
    assert 'norm.weight' in msg and 'blocks.0.attn.extra' in msg
    assert '1 missing' in msg and '1 unexpected' in msg and str(path) in msg

    # a checkpoint of another network: counts and the first few keys of each kind
    other = {f'encoder.layer{i}.weight': torch.zeros(2) for i in range(10)}
    torch.save(other, path)
    with pytest.raises(ValueError) as info:
        DinoResNet50Attention(weights=str(path))
    msg = str(info.value)
    n_expected = len([k for k in weights['dino_resnet50'] if not k.endswith('num_batches_tracked')])
    assert f'{n_expected} missing' in msg and '10 unexpected' in msg
    assert 'conv1.weight' in msg and 'encoder.layer0.weight' in msg and 'more)' in msg

    # right keys, wrong shape (a ViT-S/16 positional embedding)
    state = dict(weights['dino_vits8'])
    state['pos_embed'] = torch.zeros(1, 197, 384)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r'pos_embed \(1, 197, 384\)'):
        DinoViTS8Attention(weights=str(path))


def test_checkpoint_needing_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / VIT_FILE
    torch.save({'cls_token': torch.zeros(1, 1, 384), 'evil': NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        DinoViTS8Attention(weights=str(path))
    assert isinstance(info.value, pickle.UnpicklingError)
    msg = str(info.value)
    assert 'weights_only=True' in msg and 'arbitrary' in msg and str(path) in msg
    assert 'NotATensor' in msg  # torch's own explanation is kept
    # the same file with a Namespace only (as in DINO training checkpoints) is fine
    torch.save({'args': argparse.Namespace(a=1)}, path)
    assert load_checkpoint(path)['args'].a == 1


def test_garbage_file_raises_value_error(tmp_path):
    path = tmp_path / RESNET_FILE
    path.write_bytes(b'this is not a checkpoint')
    with pytest.raises(ValueError, match=mentions(RESNET_FILE, 'checkpoint')):
        DinoResNet50Attention(weights=str(path))


# --------------------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------------------


def test_head_index_out_of_range_and_bad_options_raise():
    for heads in (6, -1, 'median', True, 1.0):
        with pytest.raises(ValueError):
            DinoViTS8Attention(heads=heads)
        with pytest.raises(ValueError):
            DinoResNet50Attention(heads=heads)
    with pytest.raises(ValueError, match='out of range'):
        DinoResNet50Attention(heads=3, num_heads=3)
    with pytest.raises(ValueError):
        DinoResNet50Attention(layer='layer5')
    with pytest.raises(ValueError):
        DinoResNet50Attention(reduction='max')
    with pytest.raises(ValueError):
        DinoResNet50Attention(num_heads=0)
    with pytest.raises(ValueError):
        DinoViTS8Attention(resize='crop')
    with pytest.raises(ValueError):
        DinoViTS8Attention(multiple=12)  # not a multiple of the patch size
    with pytest.raises(ValueError):
        DinoViTS8Attention(input_size=0)


def test_network_input_size_policies():
    assert network_input_size(16, 16) == (224, 224)
    assert network_input_size(64, 48) == (296, 224)  # short side 224, aspect kept, long side rounded to /8
    assert network_input_size(64, 48, multiple=32) == (288, 224)
    assert network_input_size(512, 2040, multiple=8) == (224, 896)  # large images are scaled down
    assert network_input_size(64, 48, 'fixed', 224) == (224, 224)
    assert network_input_size(64, 48, 'fixed', (128, 96)) == (128, 96)
    assert network_input_size(64, 48, 'none') == (64, 48)
    assert network_input_size(13, 21, 'none') == (16, 24)
    assert network_input_size(3, 3, 'none') == (8, 8)


def test_registered_and_config_round_trip(weights, monkeypatch):
    assert ATTENTION_SOURCES['dino_vits8'] is DinoViTS8Attention
    assert ATTENTION_SOURCES['dino_resnet50'] is DinoResNet50Attention
    monkeypatch.setenv(WEIGHTS_ENV_VARS['dino_resnet50'], str(weights['files']['dino_resnet50']['plain']))
    att = build_attention_source('dino_resnet50', heads='avg', layer='layer3', num_heads=4, reduction='norm',
                                 resize='fixed', input_size=(96, 64), device='cpu', max_batch=2)
    cfg = att.config()
    assert cfg == {'name': 'dino_resnet50', 'heads': 'avg', 'weights': RESNET_FILE, 'layer': 'layer3',
                   'num_heads': 4, 'reduction': 'norm', 'resize': 'fixed', 'input_size': [96, 64], 'multiple': 32,
                   'tile': None, 'tile_overlap': None}
    again = build_attention_source_from_config(cfg)  # the bare file name is found through the env var
    assert again.config() == cfg
    img = _image(40, 30)
    np.testing.assert_allclose(again(img), att(img), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------------------


def test_aggregate_heads_on_hand_made_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 5, 7)).astype(np.float32)
    raw_max = aggregate_heads(maps, 'max', renormalize=False)
    raw_avg = aggregate_heads(maps, 'avg', renormalize=False)
    assert raw_max.shape == (5, 7) and raw_max.dtype == np.float32
    assert np.all(raw_max[None] >= maps)
    assert np.all(raw_avg >= maps.min(axis=0) - 1e-6) and np.all(raw_avg <= maps.max(axis=0) + 1e-6)
    np.testing.assert_array_equal(raw_max, maps.max(axis=0))
    np.testing.assert_allclose(raw_avg, maps.mean(axis=0), rtol=1e-6)
    for mode, raw in (('max', raw_max), ('avg', raw_avg), ('mean', raw_avg)):
        out = aggregate_heads(maps, mode)
        assert out.min() == 0.0 and out.max() == 1.0
        np.testing.assert_allclose(out, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    np.testing.assert_array_equal(aggregate_heads(maps, 3, renormalize=False), maps[3])
    # hand-made: MAX picks the strongest head per pixel, AVG their mean
    a = np.array([[[0.0, 1.0], [0.5, 0.0]], [[1.0, 0.0], [0.5, 0.0]]], np.float32)
    np.testing.assert_array_equal(aggregate_heads(a, 'max', renormalize=False), [[1.0, 1.0], [0.5, 0.0]])
    np.testing.assert_array_equal(aggregate_heads(a, 'avg', renormalize=False), [[0.5, 0.5], [0.5, 0.0]])
    np.testing.assert_array_equal(aggregate_heads(a, 'avg'), [[1.0, 1.0], [1.0, 0.0]])
    # batched and torch input; out-of-range head
    batched = torch.from_numpy(np.stack([maps, maps[::-1].copy()]))
    out = aggregate_heads(batched, 'max')
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 7)
    with pytest.raises(ValueError, match='out of range'):
        aggregate_heads(maps, 6)
    # a map without contrast becomes zeros
    assert np.all(minmax_normalize(torch.full((1, 4, 4), 0.3)).numpy() == 0.0)


@pytest.mark.parametrize('source_fixture', ['vit_source', 'resnet_source'])
def test_maps_have_image_size_float32_and_unit_range(request, source_fixture):
    att = request.getfixturevalue(source_fixture)
    for img in (_image(64, 48), _image(37, 53, seed=1, dtype=np.float64), _image(16, 16, seed=2)[:, :, 0]):
        amap = att(img)
        assert amap.shape == img.shape[:2] and amap.dtype == np.float32
        assert amap.min() >= 0.0 and amap.max() <= 1.0 and amap.max() == 1.0
        heads = att.head_maps(img)
        assert heads.shape == (att.num_heads, ) + img.shape[:2] and heads.dtype == np.float32
        assert np.all(heads.min(axis=(1, 2)) == 0.0) and np.all(heads.max(axis=(1, 2)) == 1.0)
        np.testing.assert_allclose(amap, aggregate_heads(heads, 'max'), atol=1e-6)


def test_vit_default_224_and_non_224_input_without_resizing(weights, vit_source):
    img = _image(64, 48)
    full = DinoViTS8Attention(weights=str(weights['files']['dino_vits8']['plain']))  # short side 224
    assert full.network_input_size(64, 48) == (296, 224)
    assert full(img).shape == (64, 48)
    native = DinoViTS8Attention(weights=str(weights['files']['dino_vits8']['plain']), resize='none', heads=2)
    assert native.network_input_size(64, 48) == (64, 48)  # an 8x6 patch grid: interpolated pos_embed
    amap = native(img)
    assert amap.shape == (64, 48) and amap.dtype == np.float32 and 0.0 <= amap.min() and amap.max() <= 1.0
    np.testing.assert_allclose(amap, native.head_maps(img)[2], atol=1e-6)


def test_vit_head_maps_are_cls_attention_upsampled(vit_source):
    img = _image(64, 48)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    size = vit_source.network_input_size(64, 48)
    x = F.interpolate(x, size=size, mode='bicubic', align_corners=False).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        attn = vit_source.model.get_last_selfattention(x)[0, :, 0, 1:].reshape(6, size[0] // 8, size[1] // 8)
    up = F.interpolate(attn[None], size=(64, 48), mode='bilinear', align_corners=False)[0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(vit_source.head_maps(img), ((up - lo) / (hi - lo)).numpy(), atol=1e-5)


def test_resnet_heads_are_contiguous_channel_group_means(resnet_source):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = resnet_source.features(x)
        grid = resnet_source._grid_maps(x)
    assert feats.shape == (1, 2048, 2, 3) and grid.shape == (1, 6, 2, 3)
    sizes = [342, 342, 341, 341, 341, 341]
    bounds = np.cumsum([0] + sizes)
    for k in range(6):
        torch.testing.assert_close(grid[0, k], feats[0, bounds[k]:bounds[k + 1]].mean(dim=0))
    # the size-weighted mean of the groups is the plain channel mean of the layer
    torch.testing.assert_close((grid[0] * torch.tensor(sizes, dtype=torch.float32).view(6, 1, 1)).sum(0) / 2048,
                               feats[0].mean(dim=0), rtol=1e-4, atol=1e-5)


def test_batch_stacks_equal_sizes_and_matches_single_calls(vit_source):
    images = [_image(64, 48, seed=0), _image(40, 40, seed=1), _image(64, 48, seed=2), _image(64, 48, seed=3)]
    maps = vit_source.batch(images)
    assert [m.shape for m in maps] == [(64, 48), (40, 40), (64, 48), (64, 48)]
    for img, amap in zip(images, maps):
        assert amap.dtype == np.float32
        np.testing.assert_allclose(amap, vit_source(img), atol=1e-5)
    assert vit_source.batch([]) == []


# --------------------------------------------------------------------------------------------------------------
# tiling (large inputs)
# --------------------------------------------------------------------------------------------------------------


def _patch_local_grid_maps(cell):
    """A stand-in network whose grid value depends only on its own cell: per-cell channel means and squares."""
    def grid_maps(x):
        pooled = F.avg_pool2d(x, cell)
        return torch.cat([pooled, pooled ** 2], dim=1)  # 6 "heads"
    return grid_maps


@pytest.mark.parametrize('length,tile,overlap', [(64, 28, 7), (42, 28, 7), (10, 4, 1), (11, 7, 1), (5, 7, 2),
                                                  (20, 8, 0), (100, 28, 27)])
def test_tile_windows_cover_every_cell_with_positive_weight(length, tile, overlap):
    windows = tile_windows(length, tile, overlap)
    total = np.zeros(length)
    for i, (start, weights) in enumerate(windows):
        assert len(weights) == min(tile, length) and np.all(weights > 0) and np.all(weights <= 1)
        total[start:start + len(weights)] += weights
        if i:  # neighbours overlap by at least `overlap` cells
            prev_start, prev_weights = windows[i - 1]
            assert prev_start + len(prev_weights) - start >= overlap
    assert windows[0][0] == 0 and windows[-1][0] + len(windows[-1][1]) == length
    assert np.all(total >= 1.0 - 1e-6)
    # exact partition of unity where two windows overlap by exactly `overlap` cells
    np.testing.assert_allclose(tile_windows(3 * 8 - 2 * 2, 8, 2)[1][1][:2] + tile_windows(20, 8, 2)[0][1][-2:],
                               [1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        tile_windows(10, 4, 4)


def test_tile_option_validation_and_config(weights):
    path = str(weights['files']['dino_vits8']['plain'])
    for bad in ({'tile': 20}, {'tile': 0}, {'tile': True}, {'tile': 64, 'tile_overlap': 64},
                {'tile': 64, 'tile_overlap': 12}, {'tile_overlap': 8}):
        with pytest.raises(ValueError, match='tile'):
            DinoViTS8Attention(weights=path, **bad)
    att = DinoViTS8Attention(weights=path, resize='none', tile=224)
    assert att.tile == 224 and att.tile_overlap == 56  # default: tile // 4, on the 8 px patch grid
    cfg = att.config()
    assert cfg['tile'] == 224 and cfg['tile_overlap'] == 56 and cfg['resize'] == 'none'
    assert build_attention_source_from_config({**cfg, 'weights': path}).config() == cfg
    assert DinoViTS8Attention(weights=path).config()['tile'] is None  # off by default
    rpath = str(weights['files']['dino_resnet50']['plain'])
    res = DinoResNet50Attention(weights=rpath, resize='none', tile=224)
    assert res.grid_stride == 32 and res.tile_overlap == 32  # rounded down to the layer4 stride
    assert DinoResNet50Attention(weights=rpath, layer='layer3', tile=48).tile_overlap == 0
    with pytest.raises(ValueError, match='tile'):
        DinoResNet50Attention(weights=rpath, tile=48)  # not a multiple of 32
    with pytest.raises(ValueError, match='multiple'):
        DinoResNet50Attention(weights=rpath, multiple=16, tile=64)
    # DIV2K LR at x4, (H, W) = (339, 510): 2 x 3 windows of 224 for both networks
    assert len(att.tile_boxes(339, 510)) == 6 and len(res.tile_boxes(339, 510)) == 6
    assert DinoViTS8Attention(weights=path).tile_boxes(339, 510) == [(0, 0, 224, 336)]


@pytest.mark.parametrize('source', ['dino_vits8', 'dino_resnet50'])
def test_tiled_maps_have_image_size_and_unit_range(weights, source):
    cls, tile = SOURCES[source], {'dino_vits8': 32, 'dino_resnet50': 64}[source]
    att = cls(weights=str(weights['files'][source]['plain']), resize='none', tile=tile, tile_overlap=tile // 2)
    img = _image(100, 76, seed=4)
    assert len(att.tile_boxes(100, 76)) > 1
    amap = att(img)
    assert amap.shape == (100, 76) and amap.dtype == np.float32
    assert amap.min() == 0.0 and amap.max() == 1.0
    heads = att.head_maps(img)
    assert heads.shape == (att.num_heads, 100, 76) and heads.min() >= 0.0 and heads.max() <= 1.0
    np.testing.assert_allclose(amap, aggregate_heads(heads, 'max'), atol=1e-6)
    # batching stacks the windows of several images and gives the same maps
    images = [img, _image(100, 76, seed=5)]
    for got, image in zip(att.batch(images), images):
        np.testing.assert_allclose(got, att(image), atol=1e-5)


def test_tile_larger_than_image_equals_untiled(weights):
    path = str(weights['files']['dino_vits8']['plain'])
    img = _image(64, 48, seed=6)
    plain = DinoViTS8Attention(weights=path, resize='none')
    for tile in (64, 224):
        tiled = DinoViTS8Attention(weights=path, resize='none', tile=tile)
        assert tiled.tile_boxes(64, 48) == [(0, 0, 64, 48)]
        np.testing.assert_array_equal(tiled.head_maps(img), plain.head_maps(img))
    # default resize (short side 224) with a 224 tile on a square image: one window, same maps
    square = _image(40, 40, seed=7)
    np.testing.assert_array_equal(DinoViTS8Attention(weights=path, tile=224)(square),
                                  DinoViTS8Attention(weights=path)(square))


@pytest.mark.parametrize('source,tile,overlap', [('dino_vits8', 32, 8), ('dino_vits8', 24, 0),
                                                 ('dino_vits8', 40, 32), ('dino_resnet50', 64, 32)])
def test_blending_has_no_seams_for_a_patch_local_network(weights, source, tile, overlap):
    """Windows start on the feature grid: a network whose cells only see their own patch gives the untiled map
    exactly, whatever the windows and weights; any seam or misplaced window would show up here."""
    path = str(weights['files'][source]['plain'])
    tiled = SOURCES[source](weights=path, resize='none', tile=tile, tile_overlap=overlap)
    plain = SOURCES[source](weights=path, resize='none')
    for att in (tiled, plain):
        att._grid_maps = _patch_local_grid_maps(att.grid_stride)
    img = _image(96, 136, seed=8)
    assert len(tiled.tile_boxes(96, 136)) >= 4
    np.testing.assert_allclose(tiled.head_maps(img), plain.head_maps(img), atol=1e-5)
    # a constant network: the blend divides by the summed window weights, so it is constant too (no seam where
    # the number of overlapping windows changes)
    s = tiled.grid_stride
    tiled._grid_maps = lambda x: torch.full((x.shape[0], 6, x.shape[-2] // s, x.shape[-1] // s), 0.7)
    h, w = tiled.network_input_size(96, 136)
    grid = tiled._tiled_grid_maps(torch.rand(2, 3, h, w))
    assert grid.shape == (2, 6, h // s, w // s)
    torch.testing.assert_close(grid, torch.full_like(grid, 0.7), rtol=0, atol=1e-6)
