"""Convert a downstream frame set between the layouts dataset.py reads (dataset.find_layout):
'pkl' (X.pkl, the original's), 'tsv' (X.tsv + X.lineidx) and 'v2' (X.tsv + X.id2lineidx.pkl, VIOLETv2's).

    python _tools/convert_layout.py --src _data/v2/img_msrvtt --to pkl --dst _data/img_msrvtt --sample 5
    python _tools/convert_layout.py --src _data/img_msrvtt --to v2 --dst _data/v2/img_msrvtt

The source layout is found from the files present (as dataset.py does; --src_layout to force one). Frames are
copied as they are (base64 strings, never re-encoded). --sample N keeps N frames of each video by VIOLETv2's
evaluation rule (dataset.sample_stored: evenly over the whole video, first and last included), which turns a
v2 set (more frames stored than used) into one of the original's fixed count; a video with fewer than N frames
is an error naming it. A v2 row's second field is written as the frame count; when reading, it is ignored.
"""
import argparse, os, sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from dataset import FRAME_LAYOUTS, WriteError, find_layout, load_pickle, sample_stored, write_pickle  # noqa: E402
from extract_tsv import read_tsv, usable_frames, write_tsv  # noqa: E402


def read_frames(prefix, layout='auto'):
    """-> (layout, {vid: [b64, ...]}) of the set at `prefix` (every stored frame)."""
    layout, paths = find_layout(prefix, layout)
    frames = load_pickle(paths[0]) if layout == 'pkl' else read_tsv(*paths)
    return layout, usable_frames(frames, paths[0])


def write_frames(frames, prefix, layout):
    if layout == 'pkl':
        write_pickle(frames, prefix + '.pkl')
    else:
        write_tsv(frames, prefix + '.tsv', prefix + ('.id2lineidx.pkl' if layout == 'v2' else '.lineidx'))


def convert(src, dst, to, sample=0, src_layout='auto'):
    """-> (source layout, number of videos)."""
    if sample < 0:  # it wrote every video with no frame
        raise ValueError(f'--sample must be 0 (every frame) or more, got {sample}')
    layout, frames = read_frames(src, src_layout)
    if sample:
        short = [v for v, b in frames.items() if len(b) < sample]
        if short:
            raise ValueError(f'{src}: video "{short[0]}" has {len(frames[short[0]])} frames, fewer than --sample '
                             f'{sample} ({len(short)} such videos)')
        frames = {v: [b[i] for i in sample_stored(len(b), sample, train=False)] for v, b in frames.items()}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    write_frames(frames, dst, to)
    return layout, len(frames)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, help='X (or X.pkl, X.tsv): the source files X.pkl, X.tsv + X.lineidx or X.tsv + X.id2lineidx.pkl')
    parser.add_argument('--to', required=True, choices=FRAME_LAYOUTS[1:])
    parser.add_argument('--dst', required=True, help='Y (or Y.pkl, Y.tsv): writes Y.pkl, Y.tsv + Y.lineidx or Y.tsv + Y.id2lineidx.pkl')
    parser.add_argument('--sample', type=int, default=0, help='keep N frames per video (evenly, first and last included)')
    parser.add_argument('--src_layout', default='auto', choices=FRAME_LAYOUTS)
    args = parser.parse_args()
    # X.pkl or X.tsv for X, as extract_video-frame.py's --out takes it (--dst img_a.pkl wrote img_a.pkl.pkl)
    args.src, args.dst = (p.removesuffix('.pkl').removesuffix('.tsv') for p in (args.src, args.dst))
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        sys.exit('--src and --dst must differ (the source would be overwritten while read)')
    try:
        layout, n = convert(args.src, args.dst, args.to, args.sample, args.src_layout)
    except (FileNotFoundError, ValueError, WriteError) as e:
        sys.exit(str(e))
    print(f'{args.src} ({layout}) -> {args.dst} ({args.to}): {n} videos')


if __name__ == '__main__':
    main()
