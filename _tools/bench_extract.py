"""Frames/s of one extraction worker (decode + JPEG + base64) on clips written here, before and after seeking.

    python _tools/bench_extract.py [--clips 8] [--seconds 15] [--sample 5] [--keyint 250]

Writes two sets of 320x240 30 fps clips of moving noise: OpenCV's VideoWriter (mp4v, every frame a keyframe)
and H.264 from PyAV with `--keyint` frames per GOP and B-frames (what downloaded videos look like). Times
"full" = the original's way (the release's extraction loop: PyAV demuxes and decodes every packet, turns every
frame into a PIL image, then keeps the chosen ones) and "seek" = dataset.read_video, each followed by the tool's
JPEG + base64 encoding; both return the same frames (asserted). One process, one decoder thread, best of --repeat.
"""
import argparse, os, sys, tempfile, time

import av
import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import frame_b64, read_video, sample_inside  # noqa: E402


def full_decode_sample(path, n):
    """The original tool's decoding: every frame of the file decoded and turned into an image, then the chosen kept
    (its frames int(len / (n + 1) * (i + 1)), i < n: sample_inside)."""
    imgs = []
    with av.open(path) as container:
        container.streams.video[0].codec_context.thread_count = 1  # one decoder thread, as read_video
        for packet in container.demux():
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    imgs.append(frame.to_image().convert('RGB'))
    return [np.array(imgs[i]) for i in sample_inside(len(imgs), n)]


def frames(n, rng):
    base = rng.integers(0, 256, (240 + n, 320 + n, 3), dtype=np.uint8)
    return (base[k:k + 240, k:k + 320] for k in range(n))


def write_ocv(path, n, rng):
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 30, (320, 240))
    for f in frames(n, rng):
        out.write(f)
    out.release()


def write_h264(path, n, rng, keyint):
    with av.open(path, 'w') as c:
        s = c.add_stream('libx264', rate=30, options={'x264-params': f'keyint={keyint}:bframes=3'})
        s.width, s.height, s.pix_fmt = 320, 240, 'yuv420p'
        for f in frames(n, rng):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--clips', type=int, default=8)
    parser.add_argument('--seconds', type=int, default=15)
    parser.add_argument('--sample', type=int, default=5)
    parser.add_argument('--keyint', type=int, default=250)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, write in [('opencv-mp4v', write_ocv), (f'h264-keyint{args.keyint}', None)]:
            paths = [os.path.join(tmp, f'{kind}_{i}.mp4') for i in range(args.clips)]
            for p in paths:
                write(p, args.seconds * 30, rng) if write else write_h264(p, args.seconds * 30, rng, args.keyint)
            rate = {}
            for name, fn in [('full', full_decode_sample), ('seek', read_video)]:
                best = float('inf')
                for _ in range(args.repeat):  # best of: the machine may be shared
                    t = time.perf_counter()
                    for p in paths:
                        [frame_b64(f) for f in fn(p, args.sample)]  # the extraction's encoding, on both sides
                    best = min(best, time.perf_counter() - t)
                rate[name] = args.clips * args.sample / best
            for p in paths:
                assert all(np.array_equal(a, b) for a, b in zip(read_video(p, args.sample), full_decode_sample(p, args.sample)))
            print(f'{kind}: {args.clips} clips of {args.seconds * 30} frames, {args.sample} sampled: '
                  f'full {rate["full"]:.1f} frames/s, seek {rate["seek"]:.1f} frames/s ({rate["seek"] / rate["full"]:.1f}x)')


if __name__ == '__main__':
    main()
