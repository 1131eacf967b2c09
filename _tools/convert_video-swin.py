"""Turn a public Video Swin-S Kinetics checkpoint (mmaction layout: {'state_dict': {'backbone.*', 'cls_head.*'}})
into _snapshot/ckpt_video-swin.pt, the VT weights VIOLET loads into enc_img.swin (names without prefix).

    python _tools/convert_video-swin.py --src swin_small_patch244_window877_kinetics400_1k.pth

The temporal patch kernel stays (2, 4, 4): VIOLET keeps the Kinetics weights and changes only the stride.

The file is read with weights_only=True (tensors, plain containers and numpy values: reading runs no code). An
mmaction checkpoint may also carry metadata objects (mmcv classes in 'meta') that weights_only refuses; only
then, and only with --trust-pickle, is it read with weights_only=False, which can run code from the file: use
that for the public download you trust, never for a file of unknown origin.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import WriteError, write_torch  # noqa: E402
from model import CheckpointError, UnsafeCheckpoint, read_checkpoint  # noqa: E402

try:
    from numpy._core import multiarray  # numpy 2 (numpy.core is its deprecated alias)
except ImportError:
    from numpy.core import multiarray
# what numpy values in mmaction's metadata unpickle through (arrays, dtypes, scalars; files written under
# numpy 1 name them numpy.core.*): data, no code
NUMPY_GLOBALS = [np.ndarray, np.dtype, *{type(np.dtype(c)) for c in '?bhilqBHILQefdgFDGSUO'}] + [
    (f, f'{m}.multiarray.{f.__name__}') for f in (multiarray._reconstruct, multiarray.scalar) for m in ('numpy.core', 'numpy._core')]


def read(src, trust_pickle=False):
    try:
        return read_checkpoint(src, NUMPY_GLOBALS)  # (not a torch file, or a truncated one: named)
    except UnsafeCheckpoint as e:
        if not trust_pickle:
            sys.exit(f'convert_video-swin: {e}; if it is the public Video Swin checkpoint you trust, rerun with '
                     f'--trust-pickle (reading it then can run code from the file)')
    except CheckpointError as e:
        sys.exit(f'convert_video-swin: {e}')
    print(f'convert_video-swin: reading {src} with weights_only=False (--trust-pickle)')
    return torch.load(src, map_location='cpu', weights_only=False)


def convert(src, dst, trust_pickle=False):
    if not os.path.isfile(src):
        sys.exit(f'convert_video-swin: no such file: {src}')
    ckpt = read(src, trust_pickle)
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        sys.exit(f'convert_video-swin: {src} holds no state dict')
    out = {k.removeprefix('backbone.'): v for k, v in sd.items() if k.startswith('backbone.')}
    if not out:
        sys.exit(f'convert_video-swin: {src} has no backbone.* keys (found e.g. {list(sd)[:3]})')
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    try:
        write_torch(out, dst)
    except WriteError as e:
        sys.exit(f'convert_video-swin: {e}')
    dropped = sorted({k.split('.')[0] for k in sd if not k.startswith('backbone.')})
    print(f'convert_video-swin: wrote {len(out)} tensors to {dst} (dropped: {dropped})')
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--src', required=True, help='Video Swin-S Kinetics checkpoint (.pth)')
    ap.add_argument('--dst', default='./_snapshot/ckpt_video-swin.pt')
    ap.add_argument('--trust-pickle', action='store_true',
                    help='fallback when weights_only=True refuses the file: mmaction checkpoints may carry metadata '
                         'objects (mmcv classes) beside the weights; read it with weights_only=False, which can run '
                         'code from the file (only for the trusted public checkpoint)')
    a = ap.parse_args()
    convert(a.src, a.dst, a.trust_pickle)
