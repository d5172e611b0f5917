#!/usr/bin/env python
"""Convert a published SR3 (Janspiry) or SRDiff checkpoint into a BasicSR checkpoint of our networks.

    python scripts/convert_checkpoint.py --format janspiry-sr3 I640000_E37_gen.pth pretrained/sr3_16_128.pth
    python scripts/convert_checkpoint.py --format srdiff model_ckpt_steps_400000.ckpt pretrained/srdiff_div2k.pth

Writes ``params`` and ``params_ema`` (the same weights: neither code base keeps an EMA) and the record that
rebuilds network and pipeline (``yoda_record``: then ``python -m yoda_plugin sr IMAGE -o OUT --checkpoint OUT``
needs no option file; ``--scale`` where the weights cannot tell it), and prints, last, the option blocks that
build the matching network (``network_g:`` is the very last block). OUT is not overwritten
without ``--force``. The original files also load directly through ``path.pretrain_network_g``; converting
is for a smaller, faster-loading file and for tools that expect BasicSR's layout.

``--image-size`` / ``--norm-groups`` / ``--dropout`` (SR3) set what the weights cannot tell; by default they
are the published configuration's. ``--trust-checkpoint`` loads a file that needs full unpickling
(``weights_only=False``): only for files whose origin you trust. Exit status 2 on any error.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from yoda_plugin.checkpoints import FORMATS, convert_checkpoint, count_parameters  # noqa: E402
from yoda_plugin.checkpoints.public import public_scale  # noqa: E402
from yoda_plugin.utils.torch_io import UnsafeCheckpointError  # noqa: E402

TRUST_HINT = '--trust-checkpoint on this command'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--format', choices=FORMATS + ('auto', ), default='auto',
                        help='layout of IN (default: detected from its keys)')
    parser.add_argument('input', metavar='IN', help='the published checkpoint')
    parser.add_argument('output', metavar='OUT', help='the BasicSR checkpoint to write')
    parser.add_argument('--force', action='store_true', help='overwrite OUT if it exists')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='load IN with weights_only=False (only for files you trust)')
    parser.add_argument('--image-size', type=int, default=None, help='SR3: image_size placing the attention')
    parser.add_argument('--norm-groups', type=int, default=None, help='SR3: GroupNorm groups of the trained net')
    parser.add_argument('--dropout', type=float, default=None, help='SR3: dropout for fine-tuning')
    parser.add_argument('--scale', type=int, default=None,
                        help="SR scale recorded in OUT (default: the published configuration's, 8 for SR3 and 4 for "
                             'SRDiff; an SR3 file of another configuration needs it for the record)')
    args = parser.parse_args(argv)
    if args.scale is not None and args.scale < 1:
        parser.error(f'--scale must be a positive integer, got {args.scale}')
    try:
        ckpt = convert_checkpoint(args.input, args.output, None if args.format == 'auto' else args.format,
                                  args.force, args.trust_checkpoint, args.image_size, args.norm_groups, args.dropout,
                                  args.scale)
    except UnsafeCheckpointError as err:  # name this command's switch, not those of the option files and API
        print(f'error: {err.with_hint(TRUST_HINT)}', file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    tensors, params = count_parameters(ckpt.network_g)
    print(f'{args.input}: {ckpt.label}' + (f', the layout of {ckpt.published}' if ckpt.published else ''))
    print(f'wrote {args.output}: {tensors} tensors, {params:,} parameters (params and params_ema)')
    scale = public_scale(ckpt, args.scale)
    if scale is not None:
        print(f'recorded beside the weights (yoda_record): network_g, diffusion, scale {scale}; it runs without an '
              f'option file: python -m yoda_plugin sr LR_IMAGE -o OUT_DIR --checkpoint {args.output}')
    else:
        print(f'note: no record written: the scale of this SR3 configuration is unknown; pass --scale to record it '
              f'(then {args.output} runs without an option file)')
    for note in ckpt.notes:
        print(f'note: {note}')
    print(f'# option blocks for {args.output} (or for {args.input} itself as path.pretrain_network_g):')
    print(ckpt.option_blocks(), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
