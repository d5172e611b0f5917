"""The paired LR/HR + attention dataset: shapes, value ranges, alignment under augmentation, clear errors."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from basicsr.data import build_dataset

from conftest import SCALE, mentions, synthetic_image
from yoda_plugin.attention import build_attention_source
from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
from yoda_plugin.data.lmdb_images import write_image_lmdb
from yoda_plugin.data.transforms import bicubic_resize


def ds_opt(root, split='val', **kw):
    opt = {'name': 't', 'type': 'YODAPairedDataset', 'phase': split, 'scale': SCALE,
           'dataroot_gt': os.path.join(root, f'{split}_hr.lmdb'), 'dataroot_lq': os.path.join(root, f'{split}_lr.lmdb'),
           'dataroot_attention': os.path.join(root, f'{split}_att.lmdb'), 'io_backend': {'type': 'lmdb'}}
    opt.update(kw)
    return opt


def test_item_shapes_and_ranges(tiny_data):
    ds = build_dataset(ds_opt(tiny_data))
    assert len(ds) == 2
    item = ds[0]
    assert item['lq'].shape == (3, 8, 8) and item['gt'].shape == (3, 32, 32) and item['lq_up'].shape == (3, 32, 32)
    assert item['attention'].shape == (1, 32, 32)
    for k in ('lq', 'gt', 'lq_up', 'attention'):
        assert item[k].dtype == torch.float32 and 0 <= float(item[k].min()) and float(item[k].max()) <= 1
    assert item['key'] == 'val_00'


def test_lr_made_from_hr_equals_stored_lr(tiny_data):
    given = build_dataset(ds_opt(tiny_data))[1]
    made = build_dataset(ds_opt(tiny_data, dataroot_lq=None))[1]
    assert torch.equal(given['lq'], made['lq']) and torch.equal(given['gt'], made['gt'])


def test_folder_backend_matches_lmdb(tiny_data, tmp_path):
    from yoda_plugin.data.lmdb_reader import lmdb_get
    folder = tmp_path / 'hr'
    folder.mkdir()
    for key in ('val_00', 'val_01'):
        with open(folder / f'{key}.png', 'wb') as f:
            f.write(lmdb_get(os.path.join(tiny_data, 'val_hr.lmdb'), key))
    a = build_dataset(ds_opt(tiny_data, dataroot_lq=None))[0]
    b = build_dataset(ds_opt(tiny_data, dataroot_gt=str(folder), dataroot_lq=None, io_backend={'type': 'disk'}))[0]
    assert torch.equal(a['gt'], b['gt']) and torch.equal(a['attention'], b['attention'])


def test_crop_and_augmentation_keep_lr_hr_attention_aligned(tmp_path):
    # A marker: one bright LR pixel block (and its HR block); the attention map marks the same spot.
    hr = np.zeros((64, 64, 3), np.uint8)
    hr[8:16, 40:48] = 255
    lr = np.zeros((16, 16, 3), np.uint8)
    lr[2:4, 10:12] = 255
    att = np.zeros((64, 64), np.float32)  # on the HR grid: no resampling blur in the check
    att[8:16, 40:48] = 1.0
    write_image_lmdb(str(tmp_path / 'train_hr.lmdb'), {'m': hr})
    write_image_lmdb(str(tmp_path / 'train_lr.lmdb'), {'m': lr})
    with AttentionLMDBWriter(str(tmp_path / 'train_att.lmdb'), make_attention_meta({'name': 'marker'})) as w:
        w.put('m', att)
    ds = build_dataset(ds_opt(str(tmp_path), 'train', gt_size=48, use_hflip=True, use_rot=True))
    random.seed(0)
    seen = set()
    for _ in range(40):
        item = ds[0]
        gt_on = item['gt'][0] > 0.5
        att_on = item['attention'][0] > 0.5
        lq_on = item['lq'][0] > 0.5
        if not bool(gt_on.any()):
            continue  # the crop missed the marker
        assert torch.equal(gt_on, att_on), 'attention must follow the HR crop and flips'
        lq_up_on = torch.nn.functional.interpolate(lq_on[None, None].float(), scale_factor=SCALE)[0, 0] > 0.5
        assert torch.equal(gt_on, lq_up_on), 'LR must follow the HR crop and flips'
        seen.add(tuple(torch.nonzero(gt_on)[0].tolist()))
    assert len(seen) >= 3, 'augmentation should move the marker around'


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_attention_key_is_an_error(tiny_data, tmp_path):
    lr = {'val_00': np.zeros((8, 8, 3), np.uint8)}
    with AttentionLMDBWriter(str(tmp_path / 'att.lmdb'), make_attention_meta({'name': 'edge'})) as w:
        w.put('val_00', np.zeros((8, 8), np.float32))
    with pytest.raises(KeyError, match='val_01'):
        build_dataset(ds_opt(tiny_data, dataroot_attention=str(tmp_path / 'att.lmdb')))
    assert lr


def test_missized_attention_map_is_an_error(tiny_data, tmp_path):
    with AttentionLMDBWriter(str(tmp_path / 'att.lmdb'), make_attention_meta({'name': 'edge'})) as w:
        for k in ('val_00', 'val_01'):
            w.put(k, np.zeros((5, 7), np.float32))
    ds = build_dataset(ds_opt(tiny_data, dataroot_attention=str(tmp_path / 'att.lmdb')))
    with pytest.raises(ValueError, match=r"val_00.*\(5, 7\)"):
        ds[0]


def test_attention_meta_mismatch_is_refused(tiny_data):
    with pytest.raises(ValueError, match='source.name'):
        build_dataset(ds_opt(tiny_data, attention_meta={'source': {'name': 'dino_resnet50'}}))
    build_dataset(ds_opt(tiny_data, attention_meta={'source': {'name': 'edge'}, 'grid': 'lr'}))


@pytest.mark.parametrize('change,error,words', [
    ({'gt_sise': 32}, ValueError, 'gt_sise'),
    ({'gt_size': 30}, ValueError, 'multiple of scale'),
    ({'resize': 'nearest'}, ValueError, 'resize'),
    ({'scale': 3}, ValueError, 'does not match'),
    ({'io_backend': {'type': 'memcached'}}, ValueError, 'io_backend'),
    ({'dataroot_attention': None, 'attention_required': True}, ValueError, 'attention_required'),
])
def test_bad_options(tiny_data, change, error, words):
    with pytest.raises(error, match=words):
        ds = build_dataset(ds_opt(tiny_data, **change))
        ds[0]


def test_lmdb_without_meta_info_and_key_mismatch(tiny_data, tmp_path):
    broken = _copy(os.path.join(tiny_data, 'val_hr.lmdb'), str(tmp_path / 'hr.lmdb'))
    os.remove(os.path.join(broken, 'meta_info.txt'))
    with pytest.raises(FileNotFoundError, match='meta_info.txt'):
        build_dataset(ds_opt(tiny_data, dataroot_gt=broken))
    write_image_lmdb(str(tmp_path / 'lr.lmdb'), {'val_00': np.zeros((8, 8, 3), np.uint8),
                                                 'other': np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(ValueError, match='other'):
        build_dataset(ds_opt(tiny_data, dataroot_lq=str(tmp_path / 'lr.lmdb')))


def test_unreadable_image_names_the_key(tmp_path):
    import lmdb
    write_image_lmdb(str(tmp_path / 'val_hr.lmdb'), {'bad': synthetic_image(np.random.default_rng(0), 32)})
    env = lmdb.open(str(tmp_path / 'val_hr.lmdb'))
    with env.begin(write=True) as txn:
        txn.put(b'bad', b'\x89PNG truncated')
    env.close()
    ds = build_dataset(ds_opt(str(tmp_path), dataroot_lq=None, dataroot_attention=None))
    with pytest.raises(ValueError, match='bad'):
        ds[0]


def test_grayscale_source_image_becomes_rgb(tmp_path):
    import cv2
    gray = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    (tmp_path / 'hr').mkdir()
    cv2.imwrite(str(tmp_path / 'hr' / 'g.png'), gray)
    opt = {'name': 'g', 'type': 'YODAPairedDataset', 'phase': 'val', 'scale': 4, 'dataroot_gt': str(tmp_path / 'hr')}
    item = build_dataset(opt)[0]
    assert item['gt'].shape == (3, 32, 32)
    assert torch.equal(item['gt'][0], item['gt'][1])
    assert 'attention' not in item
    src = build_attention_source('edge')
    assert src(bicubic_resize(np.repeat(gray[:, :, None], 3, 2), (8, 8))).shape == (8, 8)


def test_folder_dataset_skips_folders_named_like_images(tmp_path):
    import cv2
    import numpy as np
    from basicsr.data import build_dataset
    gt, lq = tmp_path / 'gt', tmp_path / 'lq'
    for folder, size in ((gt, 32), (lq, 8)):
        folder.mkdir()
        cv2.imwrite(str(folder / 'a.png'), np.full((size, size, 3), 128, np.uint8))
        (folder / 'b.png').mkdir()  # was taken for an image and failed when read
    ds = build_dataset({'name': 't', 'type': 'YODAPairedDataset', 'phase': 'val', 'scale': 4,
                        'dataroot_gt': str(gt), 'dataroot_lq': str(lq), 'io_backend': {'type': 'disk'}})
    assert ds.keys == ['a'] and ds[0]['gt'].shape == (3, 32, 32)


# -- BasicSR's meta_info_file (a subset of an LMDB) -------------------------------------------------------------------

def _train_opt(root, **kw):
    return ds_opt(root, 'train', phase='val', **kw)


def test_meta_info_file_selects_a_subset(tiny_data, tmp_path):
    from basicsr.data import build_dataset
    subset = tmp_path / 'subset.txt'
    subset.write_text('train_03.png (32,32,3) 1\n\ntrain_01.png (32,32,3) 1\n')  # BasicSR's meta_info layout
    ds = build_dataset(_train_opt(tiny_data, meta_info_file=str(subset)))
    assert ds.keys == ['train_03', 'train_01'] and len(ds) == 2
    assert ds[0]['key'] == 'train_03' and ds[1]['key'] == 'train_01'
    full = build_dataset(_train_opt(tiny_data))
    assert torch.equal(ds[1]['gt'], full[1]['gt'])
    (tmp_path / 'names.txt').write_text('train_05.png\n')  # folder-style: just file names
    assert build_dataset(_train_opt(tiny_data, meta_info_file=str(tmp_path / 'names.txt'))).keys == ['train_05']


def test_meta_info_file_errors_name_the_file_and_keys(tiny_data, tmp_path):
    from basicsr.data import build_dataset
    bad = tmp_path / 'bad.txt'
    bad.write_text('train_01.png (32,32,3) 1\nnope_7.png (32,32,3) 1\nnope_9.png\n')
    with pytest.raises(KeyError) as info:
        build_dataset(_train_opt(tiny_data, meta_info_file=str(bad)))
    msg = str(info.value)
    assert 'bad.txt' in msg and "lists 2 key(s)" in msg and "'nope_7'" in msg and "'nope_9'" in msg
    with pytest.raises(FileNotFoundError, match=mentions('meta_info_file', 'absent.txt')):
        build_dataset(_train_opt(tiny_data, meta_info_file=str(tmp_path / 'absent.txt')))
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n')
    with pytest.raises(ValueError, match=mentions('meta_info_file', 'empty.txt', 'no keys')):
        build_dataset(_train_opt(tiny_data, meta_info_file=str(empty)))


def test_meta_info_file_needs_attention_maps_of_the_subset_only(tiny_data, tmp_path):
    import numpy as np
    from basicsr.data import build_dataset

    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
    att = str(tmp_path / 'part_att.lmdb')
    with AttentionLMDBWriter(att, make_attention_meta({'name': 'edge'}, grid='lr')) as w:
        w.put('train_02', np.full((8, 8), 0.5, np.float32))
    with pytest.raises(KeyError, match=mentions('part_att.lmdb', '5 image key(s)')):
        build_dataset(_train_opt(tiny_data, dataroot_attention=att))
    subset = tmp_path / 'subset.txt'
    subset.write_text('train_02.png (32,32,3) 1\n')
    ds = build_dataset(_train_opt(tiny_data, dataroot_attention=att, meta_info_file=str(subset)))
    assert len(ds) == 1 and float(ds[0]['attention'].mean()) == pytest.approx(0.5, abs=1e-3)
