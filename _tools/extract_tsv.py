"""X.pkl = {video_id: [base64, ...]} -> X.tsv (`video_id\\tb64\\tb64...\\n` per video) and X.lineidx (the byte
offset of each line, one decimal number per line) (docs/violet.md#data-formats).

    python _tools/extract_tsv.py --path=_data/img_webvid2.5m_train_0
"""
import argparse, os, sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import load_pickle  # noqa: E402  plain data only: a downloaded pkl never runs code


def write_tsv(pkl, path_tsv, path_lineidx, progress=False):
    with open(path_tsv, 'wb') as tsv, open(path_lineidx, 'w') as lineidx:
        for vid, frames in tqdm(pkl.items(), ascii=True, disable=not progress):
            if '\t' in vid or '\n' in vid:
                raise ValueError(f'video id {vid!r} holds a tab or a newline')
            lineidx.write(f'{tsv.tell()}\n')
            tsv.write(('\t'.join([vid] + list(frames)) + '\n').encode('utf-8'))


def read_tsv(path_tsv, path_lineidx):
    """-> {video_id: [b64, ...]} read back through the line offsets (the inverse of write_tsv)."""
    out = {}
    with open(path_tsv, 'rb') as tsv, open(path_lineidx) as lineidx:
        for offset in lineidx:
            tsv.seek(int(offset))
            vid, *frames = tsv.readline().decode('utf-8').rstrip('\n').split('\t')
            out[vid] = frames
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', required=True, help='X: reads X.pkl, writes X.tsv and X.lineidx')
    args = parser.parse_args()
    if not os.path.isfile(args.path + '.pkl'):
        sys.exit(f'missing {args.path}.pkl')
    pkl = load_pickle(args.path + '.pkl')
    write_tsv(pkl, args.path + '.tsv', args.path + '.lineidx', progress=True)
    print(f'{args.path}.tsv, {args.path}.lineidx: {len(pkl)} lines')


if __name__ == '__main__':
    main()
