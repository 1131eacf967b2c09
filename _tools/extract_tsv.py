"""X.pkl = {video_id: [base64, ...]} -> X.tsv (`video_id\\tb64\\tb64...\\n` per video) and X.lineidx (the byte
offset of each line, one decimal number per line) (docs/violet.md#data-formats).

    python _tools/extract_tsv.py --path=_data/img_webvid2.5m_train_0

write_tsv / read_tsv also handle VIOLETv2's layout (an index X.id2lineidx.pkl = {video_id: offset} and rows
`video_id\\t<frame count>\\tb64...`); _tools/convert_layout.py converts between the layouts.
"""
import argparse, os, sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import (TSV, DataError, WriteError, load_id2lineidx, load_pickle, read_lineidx,  # noqa: E402  plain data only:
                     write_atomic, write_pickle)  # a downloaded pkl never runs code


def is_v2(path_index):
    return path_index.endswith('.id2lineidx.pkl')


def write_tsv(pkl, path_tsv, path_index, progress=False):
    """Rows of `pkl` in its order; the layout follows the index name (X.lineidx or X.id2lineidx.pkl). Each file
    is written whole or not at all (dataset.write_atomic), the index last: a TSV without its index is incomplete.
    Frames are written as tsv_field makes them."""
    v2, offsets = is_v2(path_index), {}
    bad = next((vid for vid in pkl if '\t' in vid or '\n' in vid), None)
    if bad is not None:  # (before anything is written)
        raise ValueError(f'video id {bad!r} holds a tab or a newline, which end a TSV field or row: rename it')

    def rows(tmp):
        with open(tmp, 'wb') as tsv:
            for vid, frames in tqdm(pkl.items(), ascii=True, disable=not progress):
                offsets[vid] = tsv.tell()
                frames = [tsv_field(f) for f in frames]
                tsv.write(('\t'.join([vid] + ([str(len(frames))] if v2 else []) + frames) + '\n').encode('utf-8'))

    def lines(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(''.join(f'{o}\n' for o in offsets.values()))
    write_atomic(path_tsv, rows)
    if v2:
        write_pickle(offsets, path_index)
    else:
        write_atomic(path_index, lines)


def tsv_field(frame):
    """A stored frame (base64 str or bytes, numpy's str_ too) -> its TSV field: str, without the white space inside
    (base64.encodebytes breaks lines every 76 characters, as some released pkls hold it; decoding ignores it; a line
    break would end the row, a tab the field)."""
    frame = frame.decode('ascii') if isinstance(frame, bytes) else str(frame)
    # (scanning for white space costs about 2 us a frame; a regex removing it from every frame, 120 us)
    return ''.join(frame.split()) if any(c in frame for c in '\n\r\t ') else frame


def read_tsv(path_tsv, path_index):
    """-> {video_id: [b64, ...]} read back through the index (the inverse of write_tsv; for X.id2lineidx.pkl every
    stored frame, from the row's third field on)."""
    v2, tsv = is_v2(path_index), TSV(path_tsv)
    index = load_id2lineidx(path_index) if v2 else read_lineidx(path_index)
    if not v2:  # (an index of another file, or one that lost a line, is named, as training names it)
        tsv.check_index(index, path_index)
    out = {}
    for vid_indexed, offset in (index.items() if v2 else ((None, o) for o in index)):
        vid, *frames = tsv.read(offset)  # (an offset that is not a line start is named)
        if vid_indexed is not None and vid != vid_indexed:
            raise DataError(f'{path_index}: video "{vid_indexed}" is at byte {offset} of {path_tsv}, whose line there '
                            f'is video "{vid}"')
        if vid in out:
            raise DataError(f'{path_tsv}: video "{vid}" is on two lines (at byte {offset} and an earlier one)')
        out[vid] = frames[1:] if v2 else frames
    return out


def frames_shape_problem(pkl):
    """-> what keeps a loaded pkl from being frames {video id: [base64, ...]}, or None. Frames are base64 str or
    bytes, in a list, tuple or numpy array, as dataset.py reads them; a video of no frame is no problem of the file
    (drop_frameless)."""
    if not isinstance(pkl, dict):
        return f'holds a {type(pkl).__name__}, not frames {{video id: [base64 JPEG, ...]}}'
    if not pkl:
        return 'holds no video'
    for vid, frames in pkl.items():
        if not isinstance(vid, str):
            return f'video id {vid!r} is a {type(vid).__name__}, not a str'
        if not isinstance(frames, (list, tuple, np.ndarray)) or not all(isinstance(f, (str, bytes)) for f in frames):
            return f'video "{vid}" holds {type(frames).__name__} {frames!r:.60}, not a list of base64 str'
    return None


def usable_frames(pkl, where):
    """-> a loaded frames file without its videos of no frame (training would find each a bad sample), each named on
    stderr; a DataError naming `where` when it is not frames (frames_shape_problem) or no video has a frame."""
    wrong = frames_shape_problem(pkl)
    if wrong:
        raise DataError(f'{where}: {wrong}')
    empty = [vid for vid, frames in pkl.items() if not len(frames)]
    if empty and len(empty) == len(pkl):
        raise DataError(f'{where}: no video holds a frame')
    for vid in empty:
        print(f'{where}: video "{vid}" holds no frame: left out', file=sys.stderr)
    return {vid: frames for vid, frames in pkl.items() if len(frames)} if empty else pkl


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', required=True, help='X: reads X.pkl, writes X.tsv and X.lineidx')
    args = parser.parse_args()
    if args.path.endswith('.pkl'):  # (the file's name given: it looked for X.pkl.pkl)
        args.path = args.path[:-len('.pkl')]
    if not os.path.isfile(args.path + '.pkl'):
        sys.exit(f'missing {args.path}.pkl')
    try:
        pkl = usable_frames(load_pickle(args.path + '.pkl'), args.path + '.pkl')
        write_tsv(pkl, args.path + '.tsv', args.path + '.lineidx', progress=True)
    except (WriteError, ValueError) as e:  # (DataError: a pkl that is not one; a video id with a tab)
        sys.exit(f'{args.path}.pkl: {e}' if not str(e).startswith(args.path) else str(e))
    print(f'{args.path}.tsv, {args.path}.lineidx: {len(pkl)} lines')


if __name__ == '__main__':
    main()
