"""Sample N frames of every video _X/*.mp4 into X.pkl = {video_id: [base64 JPEG, ...]} (docs/violet.md#data-formats).

    python _tools/extract_video-frame.py --path=_data/msrvtt --sample=5 [--workers 8] [--out FILE]

reads _data/_msrvtt/*.mp4 and writes _data/msrvtt.pkl. Of F decoded frames, with n = F / (N+1), frames
int(n*(i+1)) for i < N are kept (evenly inside, never the first or the last; dataset.read_video), encoded as
RGB JPEG with PIL's defaults, base64 ASCII. An unreadable or empty video is named, skipped and
counted; the exit status is non-zero when no video could be read.
"""
import argparse, base64, glob, io, os, pickle, sys
from multiprocessing import Pool

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import BadVideo, read_video  # noqa: E402


def jpeg_b64(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG')
    return base64.b64encode(buf.getvalue()).decode('ascii')


def extract_video(path, sample):
    """-> [base64 JPEG] of the `sample` chosen frames (dataset.read_video), or None when the video cannot be read."""
    try:
        return [jpeg_b64(rgb) for rgb in read_video(path, sample)]
    except BadVideo as e:
        tqdm.write(f'skipped: {e}', file=sys.stderr)
        return None


def _work(job):
    path, sample = job
    return path, extract_video(path, sample)


def extract_dir(dir_in, sample, path_out=None, workers=1, progress=True):
    """Extract every dir_in/*.mp4; write the pkl to path_out (if given). -> (pkl dict sorted by id, [bad paths])."""
    paths = sorted(glob.glob(os.path.join(dir_in, '*.mp4')))
    jobs, pkl, bad = [(p, sample) for p in paths], {}, []
    bar = tqdm(total=len(jobs), ascii=True, disable=not progress, desc=os.path.basename(dir_in))
    with Pool(workers) if workers > 1 else _Serial() as pool:
        for path, frames in pool.imap_unordered(_work, jobs, chunksize=4):
            if frames is None:
                bad.append(path)
            else:
                pkl[os.path.basename(path)[:-len('.mp4')]] = frames
            bar.update(1)
    bar.close()
    pkl = dict(sorted(pkl.items()))
    if path_out is not None:
        with open(path_out, 'wb') as f:
            pickle.dump(pkl, f)
    return pkl, sorted(bad)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', required=True, help='X: videos in _X/ (next to X), output X.pkl')
    parser.add_argument('--sample', required=True, type=int, help='frames per video (4 pretraining, 5 downstream, 1 images)')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument('--out', default=None, help='output file (default X.pkl)')
    args = parser.parse_args()
    head, name = os.path.split(os.path.normpath(args.path))
    dir_in, path_out = os.path.join(head, '_' + name), args.out or args.path + '.pkl'
    if not os.path.isdir(dir_in):
        sys.exit(f'no video folder {dir_in}')
    pkl, bad = extract_dir(dir_in, args.sample, path_out, args.workers)
    print(f'{path_out}: {len(pkl)} videos x {args.sample} frames; {len(bad)} unreadable skipped')
    if not pkl:
        sys.exit(f'no video could be read in {dir_in}')


if __name__ == '__main__':
    main()
