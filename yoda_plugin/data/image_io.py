"""Images as BasicSR's loader reads them, decoded to RGB ``uint8``: the one decoder of the command lines.

``cv2.IMREAD_COLOR`` (3-channel 8-bit BGR, EXIF orientation applied, grey and
alpha images converted), then RGB: what ``basicsr.utils.imfrombytes`` gives
the datasets, before their float conversion.
"""
import cv2
import numpy as np


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 (H, W, 3), decoded like BasicSR (IMREAD_COLOR); ValueError if undecodable."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None:
        raise ValueError('cv2 cannot decode it (corrupt, truncated or not an image)')
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) (:func:`decode_image`); ValueError if it is no image."""
    with open(path, 'rb') as f:
        return decode_image(f.read())
