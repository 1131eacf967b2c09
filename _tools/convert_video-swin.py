"""Turn a public Video Swin-S Kinetics checkpoint (mmaction layout: {'state_dict': {'backbone.*', 'cls_head.*'}})
into _snapshot/ckpt_video-swin.pt, the VT weights VIOLET loads into enc_img.swin (names without prefix).

    python _tools/convert_video-swin.py --src swin_small_patch244_window877_kinetics400_1k.pth

The temporal patch kernel stays (2, 4, 4): VIOLET keeps the Kinetics weights and changes only the stride.
"""
import argparse
import os
import sys

import torch


def convert(src, dst):
    if not os.path.isfile(src):
        sys.exit(f'convert_video-swin: no such file: {src}')
    # mmaction checkpoints carry non-tensor metadata (meta, optimizer): a trusted download, read whole
    ckpt = torch.load(src, map_location='cpu', weights_only=False)
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        sys.exit(f'convert_video-swin: {src} holds no state dict')
    out = {k.removeprefix('backbone.'): v for k, v in sd.items() if k.startswith('backbone.')}
    if not out:
        sys.exit(f'convert_video-swin: {src} has no backbone.* keys (found e.g. {list(sd)[:3]})')
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(out, dst + '.tmp')
    os.replace(dst + '.tmp', dst)
    dropped = sorted({k.split('.')[0] for k in sd if not k.startswith('backbone.')})
    print(f'convert_video-swin: wrote {len(out)} tensors to {dst} (dropped: {dropped})')
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--src', required=True, help='Video Swin-S Kinetics checkpoint (.pth)')
    ap.add_argument('--dst', default='./_snapshot/ckpt_video-swin.pt')
    a = ap.parse_args()
    convert(a.src, a.dst)
