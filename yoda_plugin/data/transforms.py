"""Resizing and augmentation shared by the YODA datasets (numpy, HWC)."""
import random
from typing import List, Sequence

import cv2
import numpy as np

RESIZE_MODES = ('pil', 'matlab')


def bicubic_resize(img: np.ndarray, size_hw: Sequence[int], mode: str = 'pil') -> np.ndarray:
    """Bicubic resize of a uint8 HxWx3 image to ``size_hw`` (uint8 out).

    ``pil``: Pillow's bicubic with antialiasing, what SR3's data preparation
    used for both the LR images and their upsampled copies. ``matlab``:
    BasicSR's MATLAB-compatible ``imresize`` (the SR benchmark convention).
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.shape[:2] == (h, w):
        return img
    if mode == 'pil':
        from PIL import Image
        return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
    if mode == 'matlab':
        from basicsr.utils.matlab_functions import imresize
        scale = h / img.shape[0]
        if abs(scale - w / img.shape[1]) > 1e-9:
            raise ValueError(f'matlab resize needs one scale for both axes, got {img.shape[:2]} -> {(h, w)}')
        out = imresize(img.astype(np.float32) / 255.0, scale)
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f'resize must be one of {RESIZE_MODES}, got {mode!r}')


def resize_attention(amap: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Bilinear resize (``cv2.INTER_LINEAR``) of an (H, W) map onto another grid, float32 clipped to [0, 1];
    the map itself when already that size. The one map resize: datasets, inference and precompute."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(amap.shape[:2]) == (h, w):
        return amap
    out = cv2.resize(np.asarray(amap).astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def augment_same(arrays: List[np.ndarray], hflip: bool, rotation: bool, rng=random) -> List[np.ndarray]:
    """Apply one random flip/rotation to every array (HWC or HW) identically."""
    do_h = hflip and rng.random() < 0.5
    do_v = rotation and rng.random() < 0.5
    do_t = rotation and rng.random() < 0.5
    out = []
    for a in arrays:
        if do_h:
            a = a[:, ::-1]
        if do_v:
            a = a[::-1]
        if do_t:
            a = a.swapaxes(0, 1)
        out.append(np.ascontiguousarray(a))
    return out
