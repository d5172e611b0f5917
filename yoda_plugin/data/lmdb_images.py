"""Write RGB images into a BasicSR-layout LMDB (PNG values, ``meta_info.txt``) with BasicSR's LmdbMaker."""
import cv2
import numpy as np


def write_image_lmdb(path: str, images: dict, compress_level: int = 1, map_size: int = 1 << 30) -> None:
    """``images``: key -> RGB uint8 (H, W, 3). Keys become the LMDB keys, as BasicSR's create_lmdb does."""
    from basicsr.utils.lmdb_util import LmdbMaker
    maker = LmdbMaker(path, map_size=map_size, batch=1000, compress_level=compress_level)
    try:
        for key, img in images.items():
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f'image {key!r} must be RGB uint8 (H, W, 3), got {img.dtype} {img.shape}')
            ok, buf = cv2.imencode('.png', np.ascontiguousarray(img[:, :, ::-1]),
                                   [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
            if not ok:
                raise ValueError(f'cannot PNG-encode image {key!r}')
            maker.put(buf.tobytes(), key, img.shape)
    finally:
        maker.close()
