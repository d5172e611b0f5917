"""Deterministic attention sources (paper Sec. 4.2.1): gaussian, edge, sift."""
import json

import cv2
import numpy as np
import pytest

from yoda_plugin.attention import (ATTENTION_SOURCES, AttentionSource, as_rgb_uint8, build_attention_source,
                                   build_attention_source_from_config, normalize_map, register_attention_source)

SOURCES = ['gaussian', 'edge', 'sift']


def flat(h=96, w=96, value=128):
    return np.full((h, w, 3), value, np.uint8)


def rectangle_image():
    img = flat()
    cv2.rectangle(img, (20, 20), (50, 45), (255, 255, 255), -1)  # x 20..50, y 20..45
    return img


BLOBS = [(30, 30), (90, 40), (60, 100)]  # (x, y)


def blob_image():
    img = flat(128, 128)
    for x, y in BLOBS:
        cv2.circle(img, (x, y), 6, (255, 255, 255), -1)
    return img


def natural_image(h=64, w=80):
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    cv2.rectangle(img, (10, 10), (40, 30), (250, 20, 20), -1)
    cv2.circle(img, (60, 45), 8, (10, 240, 10), -1)
    return img


# --------------------------------------------------------------------------- contract

@pytest.mark.parametrize('name', SOURCES)
@pytest.mark.parametrize('h,w', [(64, 80), (17, 9), (1, 1), (2, 5)])
def test_output_contract(name, h, w):
    img = natural_image(64, 80) if (h, w) == (64, 80) else np.random.default_rng(1).integers(
        0, 256, (h, w, 3), dtype=np.uint8)
    amap = build_attention_source(name)(img)
    assert amap.dtype == np.float32
    assert amap.shape == (h, w)
    assert np.isfinite(amap).all()
    assert amap.min() >= 0.0 and amap.max() <= 1.0


@pytest.mark.parametrize('name', SOURCES)
def test_input_variants_agree(name):
    src = build_attention_source(name)
    rgb = natural_image()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    ref = src(rgb)
    np.testing.assert_array_equal(src(rgba), ref)  # alpha dropped
    np.testing.assert_array_equal(src(rgb.astype(np.float32) / 255.0), ref)  # float in [0, 1]
    np.testing.assert_array_equal(src(rgb.astype(np.uint16) * 257), ref)
    g2, g3 = src(gray), src(gray[:, :, None])
    np.testing.assert_array_equal(g2, g3)
    np.testing.assert_array_equal(g2, src(np.repeat(gray[:, :, None], 3, axis=2)))
    assert g2.shape == gray.shape and g2.dtype == np.float32


@pytest.mark.parametrize('name', SOURCES)
@pytest.mark.parametrize('shape', [(8, 8, 2), (8, 8, 5), (8,), (2, 8, 8, 3), (0, 5, 3), (5, 0)])
def test_bad_shapes_raise(name, shape):
    with pytest.raises(ValueError, match=str(shape).replace('(', r'\(').replace(')', r'\)')):
        build_attention_source(name)(np.zeros(shape, np.uint8))


@pytest.mark.parametrize('name', SOURCES)
def test_bad_values_and_dtypes_raise(name):
    src = build_attention_source(name)
    with pytest.raises(ValueError, match='int64'):
        src(np.zeros((8, 8, 3), np.int64))
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        src(np.full((8, 8, 3), 200.0, np.float32))  # 0..255 data passed as float
    bad = np.zeros((8, 8, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        src(bad)


def test_as_rgb_uint8_rounding_and_clip():
    img = np.array([[[0.0, 0.5, 1.0005]]], np.float64)
    np.testing.assert_array_equal(as_rgb_uint8(img), [[[0, 128, 255]]])


def test_batch_loops():
    src = build_attention_source('edge')
    imgs = [rectangle_image(), natural_image()]
    out = src.batch(imgs)
    assert len(out) == 2
    for img, amap in zip(imgs, out):
        np.testing.assert_array_equal(amap, src(img))


# --------------------------------------------------------------------------- registry and config

def test_registry_and_unknown_source():
    assert {'gaussian', 'edge', 'sift'} <= set(ATTENTION_SOURCES)
    with pytest.raises(ValueError) as err:
        build_attention_source('dino_vits8_nope')
    msg = str(err.value)
    assert 'dino_vits8_nope' in msg and 'edge' in msg and 'gaussian' in msg and 'sift' in msg


def test_unknown_kwargs_named():
    with pytest.raises(ValueError) as err:
        build_attention_source('gaussian', sigma=0.2, sigmaa=1, bogus=3)
    msg = str(err.value)
    assert 'bogus' in msg and 'sigmaa' in msg and 'sigma' in msg


@pytest.mark.parametrize('name,kwargs', [
    ('gaussian', {'sigma': 0}), ('gaussian', {'sigma': -1}), ('gaussian', {'sigma': 'wide'}),
    ('edge', {'low_threshold': 50}), ('edge', {'low_threshold': 90, 'high_threshold': 40}),
    ('edge', {'close_kernel': -0.1}), ('sift', {'size_factor': 0}), ('sift', {'n_features': 1.5}),
    ('sift', {'n_octave_layers': 0}), ('gaussian', {'sigma': float('nan')}), ('gaussian', {'sigma': True}),
])
def test_invalid_parameter_values(name, kwargs):
    with pytest.raises(ValueError):
        build_attention_source(name, **kwargs)


@pytest.mark.parametrize('name', SOURCES)
def test_config_roundtrip(name):
    src = build_attention_source(name)
    cfg = src.config()
    assert cfg['name'] == name == src.name
    assert json.loads(json.dumps(cfg)) == cfg
    again = build_attention_source_from_config(cfg)
    assert type(again) is type(src) and again.config() == cfg
    assert name in repr(src) or type(src).__name__ in repr(src)


def test_config_lists_all_parameters():
    cfg = build_attention_source('edge', low_threshold=30, high_threshold=90, close_kernel=0.1).config()
    assert cfg == {'name': 'edge', 'low_threshold': 30.0, 'high_threshold': 90.0, 'auto_sigma': 0.33,
                   'min_threshold': 20.0, 'close_kernel': 0.1, 'blur_sigma': 0.03}
    assert set(build_attention_source('sift').config()) == {
        'name', 'size_factor', 'min_sigma', 'n_features', 'contrast_threshold', 'edge_threshold', 'n_octave_layers',
        'sift_sigma'}


def test_register_custom_source_and_conflict():
    class Ones(AttentionSource):
        name = '_test_ones'

        def __init__(self, level: float = 1.0):
            self.level = level

        def compute(self, image):
            return np.full(image.shape[:2], self.level)

    try:
        register_attention_source(Ones)
        src = build_attention_source('_test_ones', level=0.5)
        out = src(np.zeros((3, 4), np.uint8))
        assert out.dtype == np.float32 and out.shape == (3, 4) and np.all(out == 0.5)
        assert src.config() == {'name': '_test_ones', 'level': 0.5}

        class Other(AttentionSource):
            name = '_test_ones'

        with pytest.raises(ValueError, match='already registered'):
            register_attention_source(Other)
    finally:
        ATTENTION_SOURCES.pop('_test_ones', None)
    with pytest.raises(TypeError):
        register_attention_source(int)


# --------------------------------------------------------------------------- gaussian

@pytest.mark.parametrize('h,w', [(31, 45), (32, 48), (7, 7)])
def test_gaussian_peak_centre_symmetric(h, w):
    amap = build_attention_source('gaussian')(flat(h, w))
    assert amap.max() == 1.0
    np.testing.assert_allclose(amap, amap[::-1, :], atol=1e-7)
    np.testing.assert_allclose(amap, amap[:, ::-1], atol=1e-7)
    iy, ix = np.unravel_index(np.argmax(amap), amap.shape)
    assert abs(iy - (h - 1) / 2) <= 0.5 and abs(ix - (w - 1) / 2) <= 0.5
    # monotone decay from the centre along the middle row
    row = amap[h // 2, (w - 1) // 2 + 1:] if w % 2 else amap[h // 2, w // 2:]
    assert np.all(np.diff(row) < 0)


def test_gaussian_sigma_and_content_independence():
    h = w = 64
    wide, narrow = build_attention_source('gaussian', sigma=0.5), build_attention_source('gaussian', sigma=0.1)
    assert wide(flat(h, w))[0, 0] > narrow(flat(h, w))[0, 0]
    np.testing.assert_array_equal(wide(flat(h, w)), wide(natural_image(h, w)))
    # default sigma 0.25: the corner is (H - 1) / 2 = 50 px = 50 / 25.25 sigma away in each axis (~ exp(-4))
    corner = build_attention_source('gaussian')(flat(101, 101))[0, 0]
    assert corner == pytest.approx(np.exp(-(50 / 25.25) ** 2), rel=1e-5)


# --------------------------------------------------------------------------- edge

def test_edge_rectangle_high_inside_low_far():
    amap = build_attention_source('edge')(rectangle_image())
    assert amap[28:38, 28:43].min() > 0.95  # interior (more than 2 blur sigmas from the outline)
    assert amap[20:46, 20:51].mean() > 0.8  # the whole rectangle
    far = amap[70:, 70:]
    assert far.max() < 0.01
    assert amap.max() == 1.0


def test_edge_joins_near_edges_into_a_region():
    # An outline with a 2-pixel gap: closing joins it, so the inside is filled.
    img = flat(128, 128, 40)
    cv2.rectangle(img, (30, 30), (90, 90), (230, 230, 230), 2)
    img[58:61, 29:33] = 40  # break the left side
    src = build_attention_source('edge')
    amap = src(img)
    assert amap[45:75, 45:75].min() > 0.9
    assert amap[:15, :15].max() < 0.01
    regions = src.regions(img)
    assert regions[60, 60] == 255


def test_edge_no_structure_is_zero():
    src = build_attention_source('edge')
    for img in (flat(), np.zeros((40, 30), np.uint8), np.full((5, 5, 3), 1.0, np.float32)):
        amap = src(img)
        assert amap.dtype == np.float32 and not amap.any()


def test_edge_manual_thresholds_and_options():
    img = rectangle_image()
    auto = build_attention_source('edge')
    lo, hi = auto.thresholds(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    assert lo == pytest.approx(0.67 * 128) and hi == pytest.approx(1.33 * 128)
    manual = build_attention_source('edge', low_threshold=lo, high_threshold=hi)
    np.testing.assert_array_equal(manual(img), auto(img))
    binary = build_attention_source('edge', blur_sigma=0)(img)
    assert set(np.unique(binary)) <= {0.0, 1.0}
    # an impossible threshold finds no edges: all zeros
    assert not build_attention_source('edge', low_threshold=5000, high_threshold=5000)(img).any()


def test_edge_dark_image_floor():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4, (64, 64, 3), dtype=np.uint8)  # faint noise on a dark image: below the floor of 20
    cv2.rectangle(img, (20, 20), (40, 40), (255, 255, 255), -1)
    amap = build_attention_source('edge')(img)
    assert amap[25:36, 25:36].min() > 0.9
    assert amap[:8, :8].max() < 0.01
    # without the floor the median rule (median ~1.5) turns that noise into edges
    assert build_attention_source('edge', min_threshold=0)(img)[:8, :8].max() > 0.1


# --------------------------------------------------------------------------- sift

def test_sift_high_near_blobs():
    img = blob_image()
    src = build_attention_source('sift')
    amap = src(img)
    kps = src.keypoints(img)
    assert kps, 'SIFT should find the drawn blobs'
    iy, ix = np.unravel_index(np.argmax(amap), amap.shape)
    assert amap[iy, ix] == 1.0
    assert min(np.hypot(ix - x, iy - y) for x, y, _ in kps) <= 2.0  # argmax sits on a keypoint
    assert min(np.hypot(ix - x, iy - y) for x, y in BLOBS) <= 3.0  # ... which is a drawn blob
    for x, y in BLOBS:
        assert amap[y, x] > 0.8
    assert amap[0:10, 110:128].max() < 0.01  # far from every blob
    assert amap[75:85, 10:20].max() < 0.01


def test_sift_corners_of_a_square():
    img = flat(128, 128, 30)
    cv2.rectangle(img, (40, 40), (88, 88), (220, 220, 220), -1)
    src = build_attention_source('sift')
    amap = src(img)
    kps = src.keypoints(img)
    iy, ix = np.unravel_index(np.argmax(amap), amap.shape)
    assert min(np.hypot(ix - x, iy - y) for x, y, _ in kps) <= 2.0
    assert amap[:10, :10].max() < 0.05


def test_sift_flat_and_tiny_images_are_zero():
    src = build_attention_source('sift')
    for img in (flat(), flat(16, 16, 0), np.ones((3, 3), np.float32)):
        amap = src(img)
        assert amap.dtype == np.float32 and not amap.any()


def test_sift_size_factor_widens():
    img = blob_image()
    narrow = build_attention_source('sift', size_factor=0.25)(img)
    wide = build_attention_source('sift', size_factor=1.0)(img)
    assert wide.sum() > narrow.sum()


# --------------------------------------------------------------------------- normalisation

def test_normalize_map_rules():
    np.testing.assert_array_equal(normalize_map(np.zeros((3, 3))), np.zeros((3, 3), np.float32))
    np.testing.assert_array_equal(normalize_map(np.full((2, 2), 0.3)), np.ones((2, 2), np.float32))
    out = normalize_map(np.array([[2.0, 4.0], [3.0, 6.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.25, 1.0]])
    assert out.dtype == np.float32
