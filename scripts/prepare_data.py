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
stored are skipped); rerun a finished job and it does nothing. An LMDB made by something else, or with another
recipe, is refused, as is an output inside an input folder. Unreadable or too small images are reported by
path and skipped; the exit status is then 1 (2: usage or setup error, or a full disk: one line "error: no space
left on <path> ...", what was committed stays and a rerun resumes). A summary lists every LMDB with its key
count, image size, disk use and state.
"""
import argparse
import os
import sys

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yoda_plugin.data import prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prepare the paper's datasets (BasicSR LMDBs) as the option files "
                                'expect them, or --check an existing layout.')
    p.add_argument('--check', nargs='+', metavar='OPTION_FILE',
                   help='verify the data these option files read (no command needed); exit 1 on a problem')
    p.add_argument('--root', default='.', help='--check: folder the option files\' relative paths start from')
    sub = p.add_subparsers(dest='command')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--output', default='datasets', help='datasets root (default: datasets)')
    common.add_argument('--attention', nargs='+', default=[], metavar='SOURCE[:HEADS]',
                        help='attention maps to precompute on the LR LMDBs, e.g. dino_resnet50:max edge sift')
    common.add_argument('--attention-opt', action='append', default=[], metavar='SOURCE.KEY=VALUE',
                        help='attention source option (repeatable), e.g. dino_resnet50.weights=/w/dino.pth')
    common.add_argument('--device', default=None, help='torch device of the DINO sources (default cuda if available)')
    common.add_argument('--attention-batch', type=int, default=8, help='images per attention batch (default 8)')
    common.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='processes decoding and resizing images (default min(4, CPUs))')
    common.add_argument('--limit', type=int, default=None, metavar='N', help='only the first N images (sorted by name)')
    common.add_argument('--compress-level', type=int, default=1, help='PNG compression 0..9 (default 1, as BasicSR)')
    common.add_argument('--commit-every', type=int, default=16, metavar='N',
                        help='input images per LMDB transaction (default 16)')
    common.add_argument('--no-progress', action='store_true', help='no progress bars')
    faces = sub.add_parser('faces', parents=[common], help='FFHQ / CelebA-HQ: HR and LR of the face scenarios')
    faces.add_argument('--input', required=True, help='folder of face images (searched recursively)')
    faces.add_argument('--val', action='store_true', help='name the output CelebA-HQ (validation/test sets)')
    faces.add_argument('--name', default=None, help='output folder name under --output (default FFHQ / CelebA-HQ)')
    faces.add_argument('--scenarios', nargs='+', default=list(prepare.FACE_SCENARIOS),
                       choices=list(prepare.FACE_SCENARIOS), help='LR_HR sizes to make (default: all)')
    df2k = sub.add_parser('df2k', parents=[common], help='DF2K sub-images and DIV2K validation, x4')
    df2k.add_argument('--train-hr', nargs='+', metavar='DIR', help='HR folders of DF2K (DIV2K_train_HR, Flickr2K_HR)')
    df2k.add_argument('--val-hr', nargs='+', metavar='DIR', help='HR folder(s) of DIV2K validation (DIV2K_valid_HR)')
    return p


def main(argv=None) -> int:
    """Parse ``argv`` and run; the exit status: 0, 1 (an image or map failed, or --check found a problem), 2 (usage, full disk)."""
    args = build_parser().parse_args(argv)
    return prepare.run_from_args(args)


if __name__ == '__main__':
    sys.exit(main())
