"""Deterministic (non-DL) attention maps of YODA's ablation (paper Sec. 4.2.1, Table 1).

The paper describes the three baselines in one sentence each:

* Gaussian: "a simple 2D Gaussian pattern at the center of the image";
* Edge-based segmentation: "Using the Canny edge detector, the attention maps
  are defined by the edges, where adjacent and near edges are connected to
  create defined regions";
* SIFT: "applying 2D Gaussian patterns around the points of interest".

It gives no parameters, so the recipes and defaults below are ours; each class
docstring states them exactly. All sources work on the image as given (for
YODA the LR image) with OpenCV and numpy only, return ``float32`` ``(H, W)``
maps in [0, 1] and are fully deterministic for a given OpenCV build.

Normalisation (edge, SIFT): per-image min-max to [0, 1] (:func:`normalize_map`).
A map without structure (constant image, no edges, no keypoints) is all zeros;
that is a valid input to YODA, whose lower bound ``l`` (Eq. 9) still diffuses
every pixel for ``floor(T * l)`` steps. The Gaussian is image-independent and
is only scaled so that its largest pixel is exactly 1 (see its docstring).
"""
import math
import numbers

import cv2
import numpy as np

from . import AttentionSource, normalize_map, register_attention_source


def _real(name: str, value, low: float = None, high: float = None, low_open: bool = False,
          allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f'{name} must be a finite number, got {value!r}')
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        bound = f'> {low}' if low_open else f'>= {low}'
        raise ValueError(f'{name} must be {bound}, got {value}')
    if high is not None and value > high:
        raise ValueError(f'{name} must be <= {high}, got {value}')
    return value


def _int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f'{name} must be an integer, got {value!r}')
    value = int(value)
    if value < low:
        raise ValueError(f'{name} must be >= {low}, got {value}')
    return value


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the regions enclosed by a binary ``uint8`` mask (0/255).

    Same result as ``scipy.ndimage.binary_fill_holes``: background pixels not
    4-connected to the image border through background become foreground.
    """
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flooded = padded.copy()
    cv2.floodFill(flooded, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 255)  # outside reachable -> 255
    filled = padded | cv2.bitwise_not(flooded)  # unreachable background (holes) -> 255
    return filled[1:-1, 1:-1]


@register_attention_source
class GaussianAttention(AttentionSource):
    """Centred 2D Gaussian: the essential content is assumed to be in the middle.

    ``A[y, x] = exp(-((y - cy)^2 / (2 (sigma H)^2) + (x - cx)^2 / (2 (sigma W)^2)))``
    with ``cy = (H - 1) / 2``, ``cx = (W - 1) / 2`` (the exact image centre, so
    the map is mirror-symmetric in both axes), then divided by its maximum so
    the peak pixel is exactly 1 (for even sizes the centre falls between pixels).

    Args:
        sigma: standard deviation as a fraction of the image height (rows) and
            width (columns). Default 0.25: the map falls to ``exp(-2) = 0.14``
            at the borders' midpoints and ``exp(-4) = 0.02`` at the corners,
            i.e. it covers roughly the central half of the image, where a
            CelebA-HQ face sits.

    Not min-max normalised: the map does not depend on content, and stretching
    its minimum to 0 would change its profile with the aspect ratio.
    """

    name = 'gaussian'

    def __init__(self, sigma: float = 0.25):
        self.sigma = _real('sigma', sigma, low=0.0, low_open=True)

    def compute(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        y = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) / (self.sigma * h)
        x = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) / (self.sigma * w)
        g = np.exp(-0.5 * y[:, None] ** 2) * np.exp(-0.5 * x[None, :] ** 2)
        return g / g.max()


@register_attention_source
class EdgeAttention(AttentionSource):
    """Edge-based segmentation: Canny edges connected into filled regions.

    Recipe (``s = min(H, W)``):

    1. grayscale (``cv2.COLOR_RGB2GRAY``, uint8);
    2. ``cv2.Canny(gray, low, high)`` (3x3 Sobel, L1 gradient). With both
       thresholds ``None`` (default) they are automatic from the median
       intensity ``m``: ``low = max(min_threshold, (1 - auto_sigma) m)``,
       ``high = max(low, min(255, (1 + auto_sigma) m))`` (the usual median
       rule, ``auto_sigma=0.33``). The floor ``min_threshold=20`` (in Canny's
       Sobel-magnitude units) keeps dark images, whose median is near 0, from
       turning noise of a few grey levels (Sobel L1 magnitude up to ~18 for
       +-3 levels) into edges;
    3. morphological closing (dilate, then erode) with an elliptical kernel of
       ``k = max(3, round(close_kernel * s))`` pixels (made odd) so adjacent and
       near edges, less than about ``k`` pixels apart, join; ``close_kernel=0``
       skips this step;
    4. fill every region enclosed by the connected edges (:func:`fill_holes`);
    5. Gaussian blur with sigma ``max(0.5, blur_sigma * s)`` pixels (reflected
       border) so values are graded towards region borders; ``blur_sigma=0``
       keeps the binary mask;
    6. per-image min-max to [0, 1]; no edges gives all zeros, regions covering
       the whole image give all ones.

    Defaults: ``close_kernel=0.05`` joins gaps up to ~5 % of the image side (6 px
    on a 128 px image, the 3 px minimum on 16-64 px LR faces), enough to close
    the contour of an object without merging the whole image; ``blur_sigma=0.03``
    softens region borders over a few pixels without spreading attention far
    into flat background.
    """

    name = 'edge'

    def __init__(self, low_threshold: float = None, high_threshold: float = None, auto_sigma: float = 0.33,
                 min_threshold: float = 20.0, close_kernel: float = 0.05, blur_sigma: float = 0.03):
        self.low_threshold = _real('low_threshold', low_threshold, low=0.0, allow_none=True)
        self.high_threshold = _real('high_threshold', high_threshold, low=0.0, allow_none=True)
        if (self.low_threshold is None) != (self.high_threshold is None):
            raise ValueError('give both low_threshold and high_threshold, or neither (automatic thresholds)')
        if self.low_threshold is not None and self.low_threshold > self.high_threshold:
            raise ValueError(f'low_threshold ({self.low_threshold}) must not exceed '
                             f'high_threshold ({self.high_threshold})')
        self.auto_sigma = _real('auto_sigma', auto_sigma, low=0.0, high=1.0)
        self.min_threshold = _real('min_threshold', min_threshold, low=0.0, high=255.0)
        self.close_kernel = _real('close_kernel', close_kernel, low=0.0, high=1.0)
        self.blur_sigma = _real('blur_sigma', blur_sigma, low=0.0)

    def thresholds(self, gray: np.ndarray) -> tuple:
        """The (low, high) Canny thresholds used for ``gray``."""
        if self.low_threshold is not None:
            return self.low_threshold, self.high_threshold
        median = float(np.median(gray))
        low = max(self.min_threshold, (1.0 - self.auto_sigma) * median)
        high = max(low, min(255.0, (1.0 + self.auto_sigma) * median))
        return low, high

    def regions(self, image: np.ndarray) -> np.ndarray:
        """Binary uint8 mask (0/255) of the filled edge regions (steps 1-4)."""
        gray = _gray(image)
        side = min(gray.shape)
        low, high = self.thresholds(gray)
        edges = cv2.Canny(gray, low, high)
        if self.close_kernel > 0:
            k = max(3, int(round(self.close_kernel * side))) | 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, kernel)
        return fill_holes(edges)

    def compute(self, image: np.ndarray) -> np.ndarray:
        regions = self.regions(image)
        if not regions.any():
            return np.zeros(regions.shape, np.float32)
        amap = regions.astype(np.float32) / 255.0
        if self.blur_sigma > 0:
            sigma = max(0.5, self.blur_sigma * min(amap.shape))
            amap = cv2.GaussianBlur(amap, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        return normalize_map(amap)


@register_attention_source
class SiftAttention(AttentionSource):
    """SIFT keypoints, each painted as a 2D Gaussian.

    Recipe:

    1. grayscale (``cv2.COLOR_RGB2GRAY``, uint8);
    2. keypoints from ``cv2.SIFT_create(nfeatures=n_features,
       nOctaveLayers=n_octave_layers, contrastThreshold=contrast_threshold,
       edgeThreshold=edge_threshold, sigma=sift_sigma)`` (OpenCV's defaults);
       keypoints that differ only in orientation are counted once;
    3. at each keypoint ``(x, y)`` a unit-peak Gaussian
       ``exp(-((u - x)^2 + (v - y)^2) / (2 s^2))`` with
       ``s = max(min_sigma, size_factor * keypoint.size)`` pixels, evaluated
       within ``4 s`` of the keypoint;
    4. combined by pixel-wise **max** (overlapping keypoints do not pile up, so
       a cluster of keypoints is not more important than one strong one);
    5. per-image min-max to [0, 1]; no keypoints (e.g. a flat image, or a very
       small LR image) gives all zeros.

    Defaults: ``size_factor=0.5`` makes ``s`` half of ``keypoint.size`` (OpenCV's
    keypoint diameter), i.e. the keypoint's own scale: a blob of radius r gets
    about ``s = r / sqrt(2)``, so the Gaussian covers the detected structure
    and fades out around it. ``min_sigma=1`` px keeps tiny keypoints visible.
    """

    name = 'sift'

    def __init__(self, size_factor: float = 0.5, min_sigma: float = 1.0, n_features: int = 0,
                 contrast_threshold: float = 0.04, edge_threshold: float = 10.0, n_octave_layers: int = 3,
                 sift_sigma: float = 1.6):
        self.size_factor = _real('size_factor', size_factor, low=0.0, low_open=True)
        self.min_sigma = _real('min_sigma', min_sigma, low=0.0, low_open=True)
        self.n_features = _int('n_features', n_features, low=0)
        self.contrast_threshold = _real('contrast_threshold', contrast_threshold, low=0.0)
        self.edge_threshold = _real('edge_threshold', edge_threshold, low=0.0)
        self.n_octave_layers = _int('n_octave_layers', n_octave_layers, low=1)
        self.sift_sigma = _real('sift_sigma', sift_sigma, low=0.0, low_open=True)

    _TRUNCATE = 4.0

    def keypoints(self, image: np.ndarray) -> list:
        """SIFT keypoints of an RGB uint8 image as ``(x, y, size)`` tuples, orientation duplicates removed."""
        sift = cv2.SIFT_create(nfeatures=self.n_features, nOctaveLayers=self.n_octave_layers,
                               contrastThreshold=self.contrast_threshold, edgeThreshold=self.edge_threshold,
                               sigma=self.sift_sigma)
        found = sift.detect(_gray(image), None)
        return sorted({(float(kp.pt[0]), float(kp.pt[1]), float(kp.size)) for kp in found})

    def compute(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        amap = np.zeros((h, w), np.float64)
        for x, y, size in self.keypoints(image):
            s = max(self.min_sigma, self.size_factor * size)
            r = self._TRUNCATE * s
            x0, x1 = max(0, int(math.floor(x - r))), min(w, int(math.ceil(x + r)) + 1)
            y0, y1 = max(0, int(math.floor(y - r))), min(h, int(math.ceil(y + r)) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = (np.arange(x0, x1) - x) ** 2
            dy = (np.arange(y0, y1) - y) ** 2
            g = np.exp(-(dy[:, None] + dx[None, :]) / (2.0 * s * s))
            window = amap[y0:y1, x0:x1]
            np.maximum(window, g, out=window)
        return normalize_map(amap)
