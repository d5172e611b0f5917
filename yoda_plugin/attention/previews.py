"""Preview strips of attention maps (``scripts/precompute_attention.py --previews DIR``).

A strip is the LR image, then each head map (DINO sources; deterministic
sources have just the one map) and the map the attention LMDB stores
(MAX/AVG or the chosen head), colour-mapped with viridis, every tile resized
to :data:`PREVIEW_HEIGHT` px height (nearest neighbour when enlarging, so LR
pixels stay visible) and labelled, as in the paper's Fig. 3.
"""
import os
import re
from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np

from yoda_plugin.attention import AttentionSource

PREVIEW_HEIGHT = 128

Item = Tuple[str, Callable[[], np.ndarray]]  # (key, loader returning the RGB uint8 image)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Small white text with a black outline in the top-left corner (in place)."""
    scale = 0.4 if tile.shape[0] >= 64 else 0.3
    org = (3, int(round(12 * scale / 0.4)) + 1)
    cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _fit_height(tile: np.ndarray, height: int) -> np.ndarray:
    h, w = tile.shape[:2]
    width = max(1, int(round(w * height / h)))
    if (h, w) == (height, width):
        return tile.copy()
    interpolation = cv2.INTER_NEAREST if height >= h else cv2.INTER_AREA
    return cv2.resize(tile, (width, height), interpolation=interpolation)


def colorize(amap: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> BGR uint8 with OpenCV's viridis colour map (low: blue/purple, high: yellow)."""
    u8 = np.round(np.clip(np.asarray(amap, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_VIRIDIS)


def preview_tiles(source: AttentionSource, image: np.ndarray) -> List[Tuple[str, np.ndarray]]:
    """[(label, map)]: every head map (sources with ``head_maps``) and the map the LMDB stores, last."""
    tiles = []
    if hasattr(source, 'batch_head_maps'):
        from yoda_plugin.attention.dino import aggregate_heads
        heads = source.batch_head_maps([image])[0]
        tiles += [(f'head {k}', heads[k]) for k in range(heads.shape[0])]
        mode = source.heads
        label = mode.upper() if isinstance(mode, str) else f'used: head {mode}'
        tiles.append((label, aggregate_heads(heads, mode)))
    else:
        tiles.append((source.name, source(image)))
    return tiles


def preview_strip(image: np.ndarray, tiles: Sequence[Tuple[str, np.ndarray]], height: int = PREVIEW_HEIGHT):
    """BGR uint8 strip: the RGB image, then every (label, map) colour-mapped; each tile ``height`` px high."""
    parts = [_label(_fit_height(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), height), 'LR')]
    parts += [_label(_fit_height(colorize(amap), height), label) for label, amap in tiles]
    return np.concatenate(parts, axis=1)


def preview_name(key: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]', '_', key) + '.png'


def write_previews(source: AttentionSource, items: Sequence[Item], folder: str, log=print) -> int:
    """Write a preview strip per item into ``folder``; unreadable images are only reported (the main pass counts
    them). Returns the number written."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    for key, load in items:
        try:
            image = load()
            strip = preview_strip(image, preview_tiles(source, image))
            path = os.path.join(folder, preview_name(key))
            if not cv2.imwrite(path, strip):
                raise OSError(f'cv2 cannot write {path}')
            written += 1
        except Exception as err:  # noqa: BLE001  previews never stop the run
            log(f'preview of {key} skipped: {type(err).__name__}: {err}')
    return written
