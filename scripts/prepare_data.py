#!/usr/bin/env python
"""Prepare the paper's datasets as the option files expect them (BasicSR LMDBs), one command per scenario.

    # faces: FFHQ for training, CelebA-HQ (--val) for validation/testing; every face scenario at once
    python scripts/prepare_data.py faces --input /data/ffhq/images1024x1024 --output datasets \
        --attention dino_resnet50:max
    python scripts/prepare_data.py faces --input /data/celeba_hq_1024 --output datasets --val \
        --attention dino_resnet50:max
    # general SR: DF2K training sub-images and DIV2K validation
    python scripts/prepare_data.py df2k --train-hr /data/DIV2K_train_HR /data/Flickr2K_HR \
        --val-hr /data/DIV2K_valid_HR --output datasets --attention dino_resnet50:max
    # verify a layout against option files (paths relative to --root)
    python scripts/prepare_data.py --check options/train_sr3_yoda.yml options/test_sr3_yoda.yml

``faces`` writes ``<output>/FFHQ/`` (``<output>/CelebA-HQ/`` with ``--val``, ``--name`` for another folder):
``lr_16.lmdb`` + ``hr_128.lmdb`` (16->128), ``lr_64.lmdb`` + ``hr_256.lmdb`` (64->256) and ``hr_512.lmdb``
(64->512; same ``lr_64``), each size made from the original as SR3's data preparation does: Pillow bicubic
of the short side, centre crop. Images whose short side is below the largest HR size asked for are refused.
``--scenarios 16_128`` makes only that scenario. Input folders are searched recursively (FFHQ's sub-folders).

``df2k`` writes ``<output>/DF2K/DF2K_HR_sub320.lmdb`` / ``DF2K_LR_bicubic_X4_sub80.lmdb`` (320x320 HR
sub-images, step 320, a last sub-image per row/column moved inside the image; x4 LR by MATLAB bicubic of the
whole image, cut at the same places, as SRDiff's data_gen/df2k.py) and ``<output>/DIV2K/DIV2K_valid_HR.lmdb``
/ ``DIV2K_valid_LR_bicubic_X4.lmdb`` (whole images, cropped to a multiple of 4). Keys: file names without
extension; sub-images ``<name>_s001``, ``_s002``, ... row by row.

``--attention SOURCE[:HEADS] ...`` then runs the attention precompute (yoda_plugin.attention.precompute) on
each LR LMDB made: ``attention_<tag>_<16|64>.lmdb``, ``attention_<tag>_sub80.lmdb``,
``attention_<tag>_valid_X4.lmdb`` with tag ``edge``, ``sift``, ``gaussian``, ``dino_resnet50_max``,
``dino_vits8_head3``, ... DINO sources need their weights locally (``--attention-opt
dino_resnet50.weights=PATH``, ``$YODA_DINO_RESNET50`` or torch hub's checkpoints folder); without them the run
stops before any work with an error naming the file and where to get it.

Resumable and idempotent: rerun the same command after an interruption and it finishes the job (keys already
stored are skipped); rerun a finished job and it does nothing; more input images later are added. Every LMDB
records the settings that made it: a rerun with other settings (another recipe, other input images in place of
those stored, other attention options) is refused before anything is written, with one line naming the
differences; ``--force`` archives such an LMDB (``<folder>_archived_<time>``, with the attention maps made from
it) and makes it afresh. An LMDB made by something else is refused, as is an output inside an input folder, and
nothing is written into either. ``--check`` names an LMDB of an interrupted run as incomplete: rerun the same
command. Unreadable or too small images are reported by
path and skipped; the exit status is then 1 (2: usage or setup error, or a full disk: one line "error: no space
left on <path> ...", what was committed stays and a rerun resumes). A summary lists every LMDB with its key
count, image size, disk use and state.
"""
import os
import sys

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yoda_plugin.apps.prepare_data import build_parser, main  # noqa: E402,F401

if __name__ == '__main__':
    sys.exit(main())
