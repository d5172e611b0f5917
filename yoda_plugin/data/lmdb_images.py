"""Write RGB images into a BasicSR-layout LMDB (PNG values, ``meta_info.txt``) with BasicSR's LmdbMaker."""
import cv2
import numpy as np

from ..utils.disk import DiskFullError, raise_if_disk_full


def write_image_lmdb(path: str, images: dict, compress_level: int = 1, map_size: int = 1 << 30) -> None:
    """``images``: key -> RGB uint8 (H, W, 3). Keys become the LMDB keys, as BasicSR's create_lmdb does.

    A full disk (py-lmdb's commit error, ENOSPC from meta_info.txt) raises
    :class:`~yoda_plugin.utils.disk.DiskFullError` naming ``path``; LmdbMaker's batches committed before stay.
    """
    import lmdb
    from basicsr.utils.lmdb_util import LmdbMaker
    try:
        maker = LmdbMaker(path, map_size=map_size, batch=1000, compress_level=compress_level)
    except (lmdb.Error, OSError) as err:
        raise_if_disk_full(err, path)
        raise
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
    except BaseException as err:
        full = None
        if isinstance(err, (lmdb.Error, OSError)):
            try:
                raise_if_disk_full(err, path)  # probed before anything is closed
            except DiskFullError as e:
                full = e
        try:
            maker.close()
        except Exception:  # noqa: BLE001  the first error is the one to report
            _close_quietly(maker)
        if full is not None:
            raise full from err
        raise
    try:
        maker.close()
    except (lmdb.Error, OSError) as err:  # the last batch's commit or meta_info.txt on a full disk
        full = None
        try:
            raise_if_disk_full(err, path)
        except DiskFullError as e:
            full = e
        _close_quietly(maker)
        if full is not None:
            raise full from err
        raise


def _close_quietly(maker) -> None:
    for close in (maker.env.close, maker.txt_file.close):
        try:
            close()
        except Exception:  # noqa: BLE001
            pass
