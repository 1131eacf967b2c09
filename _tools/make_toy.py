"""Synthetic video-language corpus, small enough to learn on a CPU in minutes, written through the real tools
(extract_video-frame, extract_tsv, and extract_vq when --encoder is given) in the release formats.

    python _tools/make_toy.py --out _data/toy --seed 0 [--size_img 64] [--encoder encoder.pkl]

Clips: a coloured shape (5 colours x square, bar, dot) moving left / right / up / down on black, 16 frames of
80x64 (not square: exercises padding), mp4 (mp4v). Images: one 64x80 frame (portrait) with a shape in one of
4 corners. See the README.txt it writes for the files. Deterministic for a seed.

Without --encoder, the VQ targets come from a deterministic stand-in for the DALL-E tokenizer: for each 32x32
patch of the training input (padded + resized to size_img like dataset.py), its mean colour quantised to
5 bits red, 4 bits green, 4 bits blue -> token r<<8 | g<<4 | b in 0..8191; same layout as extract_vq
(int16 [T, size_img//32, size_img//32]).
"""
import argparse, importlib.util, itertools, json, os, pickle, shutil, sys, time
from multiprocessing import Pool

import cv2
import numpy as np
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from config import int_at_least  # noqa: E402
from dataset import b64_to_img  # noqa: E402
from extract_tsv import write_tsv  # noqa: E402


def load_frame_tool():
    """_tools/extract_video-frame.py (a hyphen in its name: imported by path, once)."""
    if 'extract_video_frame' not in sys.modules:
        spec = importlib.util.spec_from_file_location('extract_video_frame', os.path.join(TOOLS, 'extract_video-frame.py'))
        mod = importlib.util.module_from_spec(spec)
        sys.modules['extract_video_frame'] = mod
        spec.loader.exec_module(mod)
    return sys.modules['extract_video_frame']


COLOURS = {'red': (230, 30, 30), 'green': (30, 200, 40), 'blue': (40, 90, 255), 'yellow': (240, 230, 20),
           'white': (235, 235, 235)}  # RGB
# shapes that differ in how much of a 32x32 token they fill: the small random VT tells them apart in minutes,
# where square / circle / triangle (same extent, different outline) stayed at chance
SHAPES = ['square', 'bar', 'dot']
DIRECTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}
CORNERS = {'top left': (0, 0), 'top right': (1, 0), 'bottom left': (0, 1), 'bottom right': (1, 1)}
COMBOS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))  # 60 (colour, shape, direction)
CLIP_W, CLIP_H, CLIP_T = 80, 64, 16
V2_STORED = 12  # downstream frames stored per clip in the VIOLETv2 layout (more than the 5 used)
IMG_W, IMG_H = 64, 80
SIZE = 40  # square side and bar length in px (about half the frame); the bar is a third as tall, the dot a third as wide
MOVE = {'x': 36, 'y': 20}  # px travelled over a clip (the most that fits the frame at this SIZE)
CAPTION = ['a {c} {s} moves {d}', 'the {c} {s} is moving {d}', 'a {c} {s} going {d}']


def draw(canvas, shape, rgb, cx, cy):
    bgr, r = tuple(int(v) for v in rgb[::-1]), SIZE // 2
    cx, cy = int(round(cx)), int(round(cy))
    if shape == 'square':
        cv2.rectangle(canvas, (cx - r, cy - r), (cx + r, cy + r), bgr, -1)
    elif shape == 'bar':
        cv2.rectangle(canvas, (cx - r, cy - r // 3), (cx + r, cy + r // 3), bgr, -1)
    else:  # dot
        cv2.circle(canvas, (cx, cy), r // 3, bgr, -1, cv2.LINE_AA)


def clip_spec(rng, colour, shape, direction):
    """Start and end centre of a shape moving in `direction`, kept inside the frame."""
    dx, dy = DIRECTIONS[direction]
    r, m = SIZE // 2 + 1, MOVE['x'] if dx else MOVE['y']
    lo_x, hi_x = r + (m if dx < 0 else 0), CLIP_W - r - (m if dx > 0 else 0)
    lo_y, hi_y = r + (m if dy < 0 else 0), CLIP_H - r - (m if dy > 0 else 0)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    return dict(colour=colour, shape=shape, direction=direction, start=(x0, y0), end=(x0 + dx * m, y0 + dy * m))


def write_clip(job):
    path, spec = job
    cv2.setNumThreads(1)
    if 'corner' in spec:  # an image: one frame
        frames, (w, h) = [spec['centre']], (IMG_W, IMG_H)
    else:
        (x0, y0), (x1, y1) = spec['start'], spec['end']
        frames, (w, h) = [(x0 + (x1 - x0) * k / (CLIP_T - 1), y0 + (y1 - y0) * k / (CLIP_T - 1)) for k in range(CLIP_T)], (CLIP_W, CLIP_H)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 8, (w, h))
    if not out.isOpened():
        raise RuntimeError(f'cv2.VideoWriter cannot write {path} (mp4v)')
    for cx, cy in frames:
        canvas = np.zeros((h, w, 3), np.uint8)
        draw(canvas, spec['shape'], COLOURS[spec['colour']], cx, cy)
        out.write(canvas)
    out.release()


def image_spec(rng, colour, shape, corner):
    ix, iy = CORNERS[corner]
    r = SIZE // 2 + 2
    cx = rng.uniform(r, IMG_W / 2 - 2) if ix == 0 else rng.uniform(IMG_W / 2 + 2, IMG_W - r)
    cy = rng.uniform(r, IMG_H / 2 - 2) if iy == 0 else rng.uniform(IMG_H / 2 + 2, IMG_H - r)
    return dict(colour=colour, shape=shape, corner=corner, centre=(cx, cy))


def standin_vq(frames_b64, size_img):
    """Stand-in for the DALL-E tokens: quantised mean colour of each 32x32 patch -> int16 [T, h, w]."""
    img = torch.stack([b64_to_img(b, size_img) for b in frames_b64])
    mean = torch.nn.functional.avg_pool2d(img, 32)  # [T, 3, h, w]
    r, g, b = [(mean[:, c] * n).long().clamp(max=n - 1) for c, n in ((0, 32), (1, 16), (2, 16))]
    return ((r << 8) | (g << 4) | b).numpy().astype(np.int16)


def plan_sets(rng, n_videos, n_val, n_images, n_down, n_down_eval, frame_layout):
    """Every set: name -> (specs by video id, number of frames to sample); and the downstream specs by split."""
    sets = {}
    for name, n in [('img_toyvid_train_0', n_videos), ('img_toyvid_train_1', n_videos), ('img_toyvid_val', n_val)]:
        sets[name] = ({f'{name[4:]}_{i:05d}': clip_spec(rng, *COMBOS[rng.integers(len(COMBOS))]) for i in range(n)}, 4)
    for name, n in [('img_toyimg_train_0', n_images), ('img_toyimg_train_1', n_images), ('img_toyimg_val', n_val)]:
        sets[name] = ({f'{name[4:]}_{i:05d}': image_spec(rng, rng.choice(list(COLOURS)), rng.choice(SHAPES),
                                                         rng.choice(list(CORNERS))) for i in range(n)}, 1)
    down = {}  # downstream: each split cycles through shuffled combos, so eval captions are unique up to 60
    for split, n in [('train', n_down), ('val', n_down_eval), ('test', n_down_eval)]:
        order = np.concatenate([rng.permutation(len(COMBOS)) for _ in range(n // len(COMBOS) + 1)])
        down[split] = {f'toy_{split}_{i:05d}': clip_spec(rng, *COMBOS[order[i % len(COMBOS)]]) for i in range(n)}
    sets['img_toy'] = ({v: s for split in down for v, s in down[split].items()}, V2_STORED if frame_layout == 'v2' else 5)
    return sets, down


def write_clips(scratch, sets, workers):
    """Every set's clips (and images) as mp4 in scratch/_<set name>/."""
    shutil.rmtree(scratch, ignore_errors=True)
    jobs = []
    for name, (specs, _) in sets.items():
        os.makedirs(os.path.join(scratch, '_' + name), exist_ok=True)
        jobs += [(os.path.join(scratch, '_' + name, vid + '.mp4'), spec) for vid, spec in specs.items()]
    with Pool(workers) as pool:
        pool.map(write_clip, jobs, chunksize=16)


def extract_frames(out, scratch, sets, frame_layout, workers, progress):
    """The real frame tool on every set: tsv + lineidx (pretraining), img_toy.pkl or img_toy.tsv + .id2lineidx.pkl
    (downstream); -> the pretraining frames by video id."""
    frame_tool = load_frame_tool()
    frames = {}
    for name, (specs, sample) in sets.items():
        pkl, bad = frame_tool.extract_dir(os.path.join(scratch, '_' + name), sample,
                                          os.path.join(out, name + '.pkl') if name == 'img_toy' and frame_layout == 'pkl' else None,
                                          workers=workers, progress=progress)
        if bad or len(pkl) != len(specs):
            raise RuntimeError(f'toy videos could not be read back: {bad}')
        if name == 'img_toy' and frame_layout == 'v2':
            write_tsv(pkl, os.path.join(out, name + '.tsv'), os.path.join(out, name + '.id2lineidx.pkl'))
        elif name != 'img_toy':
            write_tsv(pkl, os.path.join(out, name + '.tsv'), os.path.join(out, name + '.lineidx'))
            frames.update(pkl)
    return frames


def write_vq(out, frames, size_img, encoder, progress):
    """vq_toyvid.pkl, vq_toyimg.pkl: the VQ targets of the pretraining sets."""
    if encoder:
        import extract_vq
        enc = extract_vq.load_encoder(encoder)
    for d in ['toyvid', 'toyimg']:
        vids = [v for v in frames if v.startswith(d)]
        if encoder:
            vq = extract_vq.encode_videos(enc, {v: frames[v] for v in vids}, size_img, progress=progress)
        else:
            vq = {v: standin_vq(frames[v], size_img) for v in vids}
        with open(os.path.join(out, f'vq_{d}.pkl'), 'wb') as f:
            pickle.dump(vq, f)


def dump_json(out, name, obj):
    with open(os.path.join(out, name), 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=0)


def write_pretrain_texts(out, sets, rng):
    """txt_toyvid.json, txt_toyimg.json: one caption per clip / image."""
    for d in ['toyvid', 'toyimg']:
        txt = {'train': {}, 'val': {}}
        for name, (specs, _) in sets.items():
            if name.startswith(f'img_{d}_'):
                for vid, s in specs.items():
                    if d == 'toyvid':
                        cap = str(rng.choice(CAPTION)).format(c=s['colour'], s=s['shape'], d=s['direction'])
                    else:
                        cap = f'a {s["colour"]} {s["shape"]} in the {s["corner"]}'
                    txt['val' if name.endswith('_val') else 'train'][vid] = [cap]
        dump_json(out, f'txt_{d}.json', txt)


def mc_options(rng, c, sh, d):
    """The true caption and 4 distractors: the same shape moving another way, another colour, another
    shape, and another (colour, shape, direction) altogether; shuffled."""
    other = lambda keys, x: str(rng.choice([k for k in keys if k != x]))
    wrong = [(c, sh, other(DIRECTIONS, d)), (other(COLOURS, c), sh, d), (c, other(SHAPES, sh), d)]
    rest = [k for k in COMBOS if k != (c, sh, d) and k not in wrong]
    wrong.append(rest[rng.integers(len(rest))])
    opts = [(c, sh, d)] + wrong
    return [f'a {o[0]} {o[1]} moves {o[2]}' for o in (opts[i] for i in rng.permutation(len(opts)))]


def write_downstream_texts(out, down, rng):
    """txt_toy-retrieval.json, txt_toy-qamc.json, txt_toy-qaoe.json for every downstream split."""
    vocab = list(COLOURS) + SHAPES + list(DIRECTIONS)
    retrieval, qamc, qaoe = {}, {}, {'vocab': vocab}
    for split, specs in down.items():
        retrieval[split], qamc[split], qaoe[split] = [], [], []
        for vid, s in specs.items():
            c, sh, d = s['colour'], s['shape'], s['direction']
            retrieval[split].append({'video': vid, 'caption': f'a {c} {sh} moves {d}'})
            opts = mc_options(rng, c, sh, d)
            qamc[split].append({'video': vid, 'question': 'what does the video show?',
                                **{f'option_{i}': o for i, o in enumerate(opts)}, 'answer': opts.index(f'a {c} {sh} moves {d}')})
            kind = int(rng.integers(3))
            q, a = [(f'what color is the {sh}?', c), (f'what shape is the {c} thing?', sh),
                    (f'where does the {c} {sh} move?', d)][kind]
            qaoe[split].append({'video': vid, 'question': q, 'answer': vocab.index(a)})
    dump_json(out, 'txt_toy-retrieval.json', retrieval)
    dump_json(out, 'txt_toy-qamc.json', qamc)
    dump_json(out, 'txt_toy-qaoe.json', qaoe)


README = """Toy VIOLET corpus (synthetic), written by _tools/make_toy.py --seed {seed} --size_img {size_img}.

Clips: 16 frames of 80x64 (mp4v) showing one shape (red/green/blue/yellow/white x square/bar/dot)
moving left/right/up/down on black. Images: one 64x80 frame with a shape in a corner ("top left", ...).
Frames were sampled by _tools/extract_video-frame.py (4 per pretraining clip, 5 per downstream clip, 1 per image)
and stored as base64 JPEG.

Pretraining (dataset.Dataset_Pretrain):
  toyvid (4 frames): txt_toyvid.json {{"train": {{vid: [caption]}}, "val": ...}}, vq_toyvid.pkl,
    img_toyvid_train_0/1.tsv + .lineidx, img_toyvid_val.tsv + .lineidx. Captions: "a red square moves left".
  toyimg (1 frame): same files for toyimg. Captions: "a blue dot in the top left".
  VQ targets: int16 [T, {hw}, {hw}] per video from {vq}.
Downstream (dataset `toy`, {down_frames}; train / val / test):
  txt_toy-retrieval.json: {{"video", "caption": "a red square moves left"}}; val and test each hold distinct
    (colour, shape, direction) captions while they number at most 60.
  txt_toy-qamc.json: "what does the video show?" with 5 captions (shuffled): the true one, the same shape moving
    another way, another colour, another shape, another (colour, shape, direction); "answer" = its index.
  txt_toy-qaoe.json: colour, shape or direction questions; "answer" indexes "vocab" (12 words).
Videos per set:
{counts}
"""


def write_readme(out, counts, seed, size_img, encoder, frame_layout):
    down_frames = ('5 frames, img_toy.pkl' if frame_layout == 'pkl' else f"VIOLETv2's layout: img_toy.tsv + "
                   f'img_toy.id2lineidx.pkl, {V2_STORED} frames stored per clip, train with size_frame 5')
    with open(os.path.join(out, 'README.txt'), 'w', encoding='utf-8') as f:
        f.write(README.format(seed=seed, size_img=size_img, hw=size_img // 32, counts=json.dumps(counts, indent=1),
                              down_frames=down_frames,
                              vq='the DALL-E encoder ' + encoder if encoder else
                              'the stand-in tokenizer (mean colour of each 32x32 patch, 5/4/4 bits RGB -> r<<8|g<<4|b)'))


def make_toy(out, seed=0, size_img=64, encoder=None, n_videos=240, n_val=60, n_images=120, n_down=480,
             n_down_eval=60, workers=None, progress=False, keep_videos=False, frame_layout='pkl'):
    """Write the corpus into `out`; -> dict of counts. frame_layout 'v2': the downstream frames in VIOLETv2's
    layout instead (img_toy.tsv + img_toy.id2lineidx.pkl, V2_STORED frames stored per clip; train with size_frame 5)."""
    t0 = time.time()
    workers = workers or os.cpu_count() or 1
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: specs, pretraining texts, downstream texts
    os.makedirs(out, exist_ok=True)
    sets, down = plan_sets(rng, n_videos, n_val, n_images, n_down, n_down_eval, frame_layout)
    scratch = os.path.join(out, '_videos')
    write_clips(scratch, sets, workers)
    frames = extract_frames(out, scratch, sets, frame_layout, workers, progress)
    if not keep_videos:
        shutil.rmtree(scratch)
    write_vq(out, frames, size_img, encoder, progress)
    write_pretrain_texts(out, sets, rng)
    write_downstream_texts(out, down, rng)
    counts = {name: len(specs) for name, (specs, _) in sets.items()}
    write_readme(out, counts, seed, size_img, encoder, frame_layout)
    counts['seconds'] = round(time.time() - t0, 1)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='_data/toy')
    parser.add_argument('--seed', type=int_at_least(0), default=0)
    parser.add_argument('--size_img', type=int, default=64, choices=range(32, 449, 32), metavar='SIZE',
                        help='training input size the VQ targets are made for (a multiple of 32, as size_img)')
    parser.add_argument('--encoder', default=None, help='DALL-E encoder.pkl (default: the stand-in tokenizer)')
    parser.add_argument('--n_videos', type=int_at_least(1), default=240, help='pretraining clips per train part')
    parser.add_argument('--n_val', type=int_at_least(1), default=60, help='pretraining val clips / images')
    parser.add_argument('--n_images', type=int_at_least(1), default=120, help='pretraining images per train part')
    parser.add_argument('--n_down', type=int_at_least(1), default=480, help='downstream train videos')
    parser.add_argument('--n_down_eval', type=int_at_least(1), default=60, help='downstream val and test videos (each)')
    parser.add_argument('--workers', type=int_at_least(1), default=None)
    parser.add_argument('--keep_videos', action='store_true', help='keep the mp4s in OUT/_videos')
    parser.add_argument('--frame_layout', default='pkl', choices=['pkl', 'v2'],
                        help="downstream frames: img_toy.pkl (5 per clip) or VIOLETv2's img_toy.tsv + .id2lineidx.pkl "
                             f"({V2_STORED} per clip; train with --set size_frame=5)")
    a = parser.parse_args()
    counts = make_toy(a.out, a.seed, a.size_img, a.encoder, a.n_videos, a.n_val, a.n_images, a.n_down, a.n_down_eval,
                      a.workers, progress=True, keep_videos=a.keep_videos, frame_layout=a.frame_layout)
    print(f'{a.out}: {counts}')


if __name__ == '__main__':
    main()
