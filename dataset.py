"""Datasets of VIOLET (docs/violet.md#data-formats): frames as base64 JPEG strings in .pkl or .tsv+.lineidx (or
VIOLETv2's .tsv+.id2lineidx.pkl),
texts in txt_<name>.json, VQ targets in vq_<dataset>.pkl.

Frame counts. Every sample of a dataset must have the same number of frames T (batches are stacked):
  - pretraining: T is taken from the entries of vq_<dataset>.pkl (mvm_target 'vq'), or from the videos
    of the split's TSV (mvm_target 'pixel', which reads no VQ file);
  - downstream: T is args['size_frame'] when it is > 0, else the frame count of img_<dataset>.pkl / .tsv
    (5 for the released sets).
"From the videos" means the count most of a sample of them have (common_frame_count), so one short video
cannot make every healthy one "bad"; the sampled videos that disagree are named.
A video with another count is a bad sample, never truncated or padded. Except in VIOLETv2's downstream
layout (find_layout), which stores more frames than are used: there size_frame must be set, and that many
of each video's frames are sampled (sample_stored); a video with fewer is a bad sample.

Bad samples (corrupt base64 or image, video id missing from frames / texts / vq, a lineidx offset that
is not a line start, a wrong frame count, an item without a required key, a caption / question / option
that is not a string, or empty (only whitespace; a QA-MC question may be empty, said once per split), an
answer out of range)
raise BadSample (a DataError; KeyError too for missing keys) naming the file and the video id or line.
With args['skip_bad'] = True, __getitem__ returns None instead, and collate_skip counts them.
Missing files raise FileNotFoundError naming the path, always; any other unusable data file (a missing split or
"vocab", invalid JSON, a truncated pickle, the wrong frame count) a DataError naming it.
Pickled data files (img_*.pkl, vq_*.pkl, and the tools' inputs) are read by load_pickle, which refuses anything
but containers, str, bytes, numbers and numpy arrays: reading a downloaded data file never runs code.
"""
import base64, binascii, collections, contextlib, dataclasses, functools, io, json, math, os, pickle, random, re, shutil
import struct, unicodedata

import av
import numpy as np
import torch
from torch.utils.data import default_collate
try:  # torchvision 0.29 deprecates its image decoders (a DeprecationWarning per call, silent outside tests)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without them: every image goes through PIL
    decode_jpeg = None
from PIL import Image, UnidentifiedImageError

import config
from model import MAX_FRAMES, VQ_VOCAB, say

FRAME_LAYOUTS = ('auto', 'pkl', 'tsv', 'v2')


@dataclasses.dataclass
class DataConfig:
    """The data's config keys (config.key: type, default, help; what values each takes). The tokenizer is the one of
    the model's txt_backbone (model.ModelConfig) unless txt_vocab names another."""
    dataset: str = config.key('', 'downstream frames: `img_<dataset>.pkl` (or `.tsv` + `.lineidx` / `.id2lineidx.pkl`, see `frame_layout`)')
    task: str = config.key('', 'downstream texts: `txt_<task>.json`; names the output dir and checkpoints')
    datasets: list[str] = config.key(['webvid2.5m', 'cc3m'], 'pretraining datasets, in order; each trains on every `img_<d>_train_<k>.tsv` on disk')
    path_data: str = config.key('./_data', 'where the data files are')
    size_img: int = config.key(224, 'frame side after padding to square (multiple of 32, at most 448)',
                               choices=range(32, 449, 32))  # the VT's 32 px patches; emb_pos has 14 x 14
    size_txt: int = config.key(32, 'text length in tokens (padded / truncated; [CLS] and [SEP] included: 2 would leave no word)', least=3)
    size_frame: int = config.key(0, 'downstream frames per video; 0: the count most of a sample of 32 videos have (5 in the released sets; the others are named; the run records it in its `args.json`); must be set for the `v2` layout (VIOLETv2 uses 5); at most 6 (`emb_len`)', choices=range(MAX_FRAMES + 1))
    frame_layout: str = config.key('auto', 'downstream frame files (`dataset.find_layout`): `pkl` (`img_<dataset>.pkl`), `v2` (VIOLETv2: `img_<dataset>.tsv` + `img_<dataset>.id2lineidx.pkl`, `size_frame` of the stored frames sampled per video), `tsv` (`img_<dataset>.tsv` + `.lineidx`); `auto`: the first of these whose files are present', choices=FRAME_LAYOUTS)
    size_option: int = config.key(5, 'QA-MC options per question', least=1)
    size_vocab: int = config.key(0, 'QA-OE answer classes; 0: the length of the json\'s `vocab` (the run records the count in its `args.json`); more classes than `vocab` names are never a target (as in the original; `vocab.json` lists them as null); a json without `vocab` (answer indices alone, as the original read them) needs it set and writes no `vocab.json`', least=0)
    txt_vocab: str = config.key('', 'the tokenizer\'s vocabulary: a `vocab.txt` file or a tokenizer directory; `""`: the tokenizer of `txt_backbone`. Either must fit the BERT config (same `vocab_size`, `[CLS]`/`[SEP]`/`[PAD]`/`[MASK]` at 101/102/0/103, as bert-base-uncased), else the run stops naming what is missing; a directory without `vocab.txt` or `tokenizer.json` is an error, never a stand-in tokenizer')
    skip_bad: bool = config.key(False, 'skip and count bad samples instead of stopping')
    fast_decode: bool = config.key(False, 'decode JPEG frames at least 4x `size_img` at 1/2, 1/4 or 1/8 scale (libjpeg\'s DCT scaling): decoding 1.2x (1280x720) to 1.5x (1920x1080) faster, but their values move from the original\'s (0.1-0.6/255 on average, up to 9/255 at single pixels of photo-like frames; see Benchmark). Off: every pixel is decoded, within 1/255 of the original\'s PIL path (equal to it for frames enlarged or shrunk by under 1.4x)')
    num_workers: int = config.key(-1, 'DataLoader workers per process; `-1`: one per CPU of the process\'s share of the node (usable CPUs / LOCAL_WORLD_SIZE) but one, at most 8 (on one H100 with 16 cores, 8 keep up with every full-size bf16 step, 4 with all but QA-OE; see Benchmark); `0`: load in the main process. Each unit\'s line says what share of its time rank 0 waited for batches; the first over 10 % says to raise this', least=-1)


DEFAULTS = config.defaults(DataConfig)
# bert-base-uncased's special token ids: padding (mask = txt != 0) and masking (main_pretrain.py) rely on them
SPECIAL_IDS = {'[CLS]': 101, '[SEP]': 102, '[PAD]': 0, '[MASK]': 103}


class DataError(ValueError):
    """Input data that cannot be used, named in the message (file, key, line or video); the scripts print it alone."""


class BadSample(DataError):
    """One unusable sample; skipped (counted) under args['skip_bad'], raised otherwise."""


class MissingKey(DataError, KeyError):
    """A data file lacks a key it needs (a split, "vocab")."""
    __str__ = BaseException.__str__  # KeyError would quote the message


def error_message(e):
    """The message of a DataError, also when a DataLoader worker raised it: torch raises it again in the main
    process with the worker's traceback in front, and the message as its last line."""
    msg = str(e)
    if msg.startswith('Caught ') and '\nOriginal Traceback' in msg:
        msg = msg.rstrip().splitlines()[-1].split(': ', 1)[-1]
    return msg


class BadVideo(ValueError):
    """A video file that cannot be read: missing, not a video, or without frames."""


def sample_inside(count, n):
    """The original extraction's frame choice (docs/violet.md#data-formats): of `count` frames, with s = count / (n+1),
    frames int(s*(i+1)) for i < n (evenly inside, never the first or the last; repeats when count < n)."""
    s = count / (n + 1)
    return [int(s * (i + 1)) for i in range(n)]


def sample_even(start, end, n):
    """VIOLETv2's `sampling`: n indices evenly from start to end, both included, each rounded by Python's
    round (half to even); the middle one when n = 1."""
    if n == 1:
        return [int(round((start + end) / 2))]
    step = (end - start) / (n - 1)
    return [int(round(start + k * step)) for k in range(n)]


def sample_stored(count, n, train, rng=random):
    """Which n of a video's `count` stored frames VIOLETv2 uses (its `temporal_sample`; count >= n).
    Evaluation: sample_even(0, count-1, n), over the whole video. Training: stride = ceil(count/n), a random
    start in 0..stride-1, end = min(start + (n-1)*stride, count-1), then sample_even(start, end, n) (so a
    clipped end spreads the n frames evenly up to the last frame, as VIOLETv2 does)."""
    stride = math.ceil(count / n)
    start = rng.randrange(stride) if train else 0
    end = min(start + (n - 1) * stride, count - 1) if train else count - 1
    return sample_even(start, end, n)


def read_video(path, n_frames, upright=False):
    """-> `n_frames` RGB uint8 arrays [H, W, 3] of the video file at `path`: frames sample_inside(count, n_frames)
    of the frames the original's extraction listed, count = all of them: the video's, after the file's cover pictures
    (video_stream, pick), or those of every video track when there are several; each converted as the original's
    extraction converted it (frame_rgb). Raises BadVideo naming the
    file, also when it has fewer than n_frames frames: the original's extraction repeated frames of such a clip, but
    every reader here refuses a video short of the frames it needs (prediction, convert_layout, the v2 layout), so
    the extraction tool lists it as failed instead of storing a clip of repeated frames.

    Decodes only what it returns (PyAV, one thread: parallelism belongs to the caller). The frame count and
    each frame's timestamp come from the packet index (demuxing reads no pixels; the container's header count
    is not trusted); each chosen frame is reached by seeking to the keyframe before it and decoding forward to
    its exact timestamp. A file without timestamps or keyframe flags or with two frames of one timestamp, one that
    does not open with a keyframe (cut without re-encoding), and one where a chosen timestamp is not found, is
    decoded from the start instead, as the original decoded every file
    (_decode_all: same frames, tested). So is a damaged one (a packet cut short, as in a truncated download, or one
    the decoder refuses on the way), which the original's loop stopped at with an error, ending its whole
    extraction: here the frames before the damage are sampled, as OpenCV's read loop would give them.
    upright: turn a video with a rotation in its header upright (frame_rgb); off, as the original."""
    if n_frames < 1:
        raise ValueError(f'n_frames must be >= 1, got {n_frames}')
    if not os.path.isfile(path):
        raise BadVideo(f'{path}: ' + (f'a broken link (to {os.readlink(path)})' if os.path.islink(path) and
                                      not os.path.exists(path) else
                                      'a folder, not a video file' if os.path.isdir(path) else
                                      'not a regular file (a named pipe, a socket or a device)' if os.path.exists(path)
                                      else 'no such file'))
    if os.path.getsize(path) == 0:  # FFmpeg's word for it is 'Invalid data found when processing input'
        raise BadVideo(f'{path}: an empty file (0 bytes)')
    if is_image(path):
        return read_image(path, n_frames)
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise BadVideo(f'{path}: ' + (cut_short(path) or f'not a video ({e})')) from e
    try:
        with container:
            if not container.streams.video:
                raise BadVideo(f'{path}: ' + (cut_short(path) or 'not a video (no video stream)'))
            stream, covers = video_stream(container)
            frames = None if stream is None else _indexed_frames(container, stream, covers, path, n_frames, upright)
            if frames is None:  # no usable index, damage, several tracks: decoded from the start, as the original
                frames = _decode_all(path, n_frames, upright)
    except av.FFmpegError as e:  # it opened as a video: its data is damaged
        raise BadVideo(f'{path}: a corrupt video, its frames cannot be decoded ({e})') from e
    return frames


def _indexed_frames(container, stream, covers, path, n_frames, upright):
    """read_video's fast path: the chosen frames of the file's one video track found through its packet index and
    decoded by seeking (_seek_decode), or None when the index cannot stand for the frames or the seek fails (then
    the file is decoded from the start)."""
    packets = [(p.pts, p.dts, p.is_keyframe, p.is_corrupt) for p in container.demux(stream)
               if p.size and not p.is_discard]
    if not packets:
        raise BadVideo(f'{path}: ' + (cut_short(path) or 'no frames'))
    if any(pts is None for pts, _, _, _ in packets) or any(bad for *_, bad in packets):
        return None
    # a codec that reorders frames (B-frames) in a container that keeps no display order (AVI, ASF: timestamps made
    # up in decoding order, ever increasing): the packets' timestamps are not the frames' (H.264 in AVI gave frames
    # 4, 10, 14, 20, 24 for 5, 10, 15, 20, 25)
    if stream.codec_context.has_b_frames and all(a[0] < b[0] for a, b in zip(packets, packets[1:])):
        return None
    pts = sorted(pts for pts, _, _, _ in packets)
    keys = sorted((pts, pts if dts is None else dts) for pts, dts, key, _ in packets if key)
    # a stream that flags no keyframe cannot be entered by seeking; one that gives two frames the same timestamp
    # cannot be indexed by it (a frame would stand for both); one that does not open with the keyframe of its first
    # frame (cut mid-GOP without re-encoding) has packets before it that give no frame, which only decoding counts
    # (the packet index would count them as frames)
    first_pts, _, first_key, _ = packets[0]
    if not (keys and len(set(pts)) == len(pts) and first_key and first_pts == pts[0]):
        return None
    want = pick(len(pts), n_frames, path, covers)
    if want is None:  # the original kept a cover picture
        return None
    try:
        return _seek_decode(container, stream, [pts[i] for i in want], keys, upright)
    except av.FFmpegError:  # a damaged packet on the way: decoded from the start, up to it
        return None


def cut_short(path):
    """Why a video file that gives no frame (or does not open) is damaged, when its own header says it is longer than
    it is, as an interrupted download or copy leaves it (MP4 / MOV, AVI, Matroska / WebM); else None."""
    return mp4_cut_short(path) or riff_cut_short(path) or matroska_cut_short(path)


def riff_cut_short(path):
    """An AVI (a RIFF file of form AVI) shorter than its RIFF header says -> why, else None. A size of 0 or 0xFFFFFFFF
    is unknown (FFmpeg writes it when the output cannot seek: a pipe)."""
    with open(path, 'rb') as f:
        head = f.read(12)
    have, said = os.path.getsize(path), int.from_bytes(head[4:8], 'little')
    if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'AVI ' or said in (0, 0xFFFFFFFF) or said + 8 <= have:
        return None
    return f'an AVI file cut short: {have} of the {said + 8} bytes its header gives: an interrupted download or copy?'


def matroska_cut_short(path):
    """A Matroska / WebM file shorter than its Segment's size -> why, else None (its size may be unknown: a live
    recording's)."""
    def vint(f):  # EBML's variable-length integer -> (value, all value bits set)
        first = f.read(1)
        if not first or first[0] == 0:
            return None, False
        n = 8 - first[0].bit_length() + 1
        rest = f.read(n - 1)
        value = int.from_bytes(bytes([first[0] & (0xFF >> n)]) + rest, 'big')
        return value, value == (1 << (7 * n)) - 1
    with open(path, 'rb') as f:
        if f.read(4) != b'\x1a\x45\xdf\xa3':
            return None
        header, _ = vint(f)
        if header is None:
            return None
        f.seek(header, 1)
        if f.read(4) != b'\x18\x53\x80\x67':  # the Segment
            return None
        size, unknown = vint(f)
        end = None if size is None or unknown else f.tell() + size
    have = os.path.getsize(path)
    if end is None or end <= have:
        return None
    return f'a Matroska file cut short: {have} of the {end} bytes its header gives: an interrupted download or copy?'


def mp4_cut_short(path):
    """For an MP4 / MOV file that FFmpeg cannot open (it says 'Invalid data', 'End of file' or finds no stream,
    depending on where the file stops): why, when it is cut short, as an interrupted download or copy leaves it:
    its last top-level box reaching past its end, or its index (the moov box, often written last) missing; else
    None (not an MP4, or not cut)."""
    size, pos, kinds = os.path.getsize(path), 0, []
    with open(path, 'rb') as f:
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], 'big'), head[4:8] if len(head) >= 8 else None
            if n == 1:  # a 64-bit size follows
                n = int.from_bytes(head[8:16], 'big') if len(head) == 16 else size + 1
            elif n == 0:  # to the end of the file
                n = size - pos
            if not kinds and kind != b'ftyp' or kind is not None and n < 8:
                return None  # not an ISO media file, or not the box structure of one
            kinds.append(kind)
            pos += max(n, 8)
    index = b'moov' in kinds[:-1]
    if pos > size:
        before = '' if index else ', before its index (moov)'
        last = (f'inside the header of a box{before}' if kinds[-1] is None else
                f'{pos - size} bytes short of the end of its index (the moov box)' if kinds[-1] == b'moov' else
                f"{pos - size} bytes short of the end of its {kinds[-1].decode('latin-1')!r} box{before}")
        return f'an MP4 cut short: it ends {last}: an interrupted download or copy?'
    if b'moov' not in kinds:
        return 'an MP4 without its index (no moov box): an interrupted download or copy?'
    return None


IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')  # (a GIF is a video: TGIF's are)


def is_image(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS


def read_image(path, n_frames=1):
    """A photo as a one-frame video: [RGB uint8 [H, W, 3]], decoded by decode_image, as training decodes a stored
    frame (the extraction tool stores a JPEG's own bytes), so a prediction on the file sees what training on it saw.
    An animated WebP or PNG (APNG; FFmpeg reads neither's frames) is a video of its frames, as PIL composes them,
    sampled as a video's (sample_inside): it was '1 frame (an image)'."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        pil = Image.open(io.BytesIO(raw))
        if pil.format in ('WEBP', 'PNG') and getattr(pil, 'is_animated', False):
            still = 1 if pil.info.get('default_image') else 0  # (an APNG's still for viewers without APNG)
            frames = []
            for i in pick(pil.n_frames - still, n_frames, path):
                pil.seek(i + still)
                frames.append(rgb_array(pil))
            return frames
        if n_frames > 1:
            raise BadVideo(f'{path}: 1 frame (an image), fewer than the {n_frames} asked for')
        return [decode_image(raw).permute(1, 2, 0).numpy()]
    except BadVideo:
        raise
    except IMAGE_ERRORS as e:
        raise BadVideo(f'{path}: not an image ({image_error(e)})') from e


IMAGE_ERRORS = (binascii.Error, RuntimeError, OSError, UnidentifiedImageError, ValueError)  # what decoding raises


def image_error(e):
    """A decoder's message without PIL's address of its BytesIO or torchvision's source file and line."""
    return re.sub(r'^\w+, \S+\.cpp:\d+, | <[^<>]* at 0x[0-9a-f]+>', '', str(e))


def _decode_all(path, n_frames, upright=False):
    """The chosen frames of the file decoded from the start as the original decoded it (_frames_in_order: its
    covers and every video track too): every frame up to the first packet the decoder refuses. Two passes (count,
    then keep the chosen), one frame in memory at a time (the original held every frame of the video as an image)."""
    error = []
    count = sum(1 for _ in _frames_in_order(path, error))
    if error and count < n_frames:
        raise BadVideo(f'{path}: a corrupt video, its frames cannot be decoded ({error[0]})' +
                       (f'; the {count} before the damage are fewer than the {n_frames} asked for' if count else ''))
    if not count:
        raise BadVideo(f'{path}: ' + (cut_short(path) or 'no frames'))
    want = pick(count, n_frames, path)
    kept = {}
    for k, frame in enumerate(_frames_in_order(path, [])):
        if k in want:
            kept[k] = frame_rgb(frame, upright)
        if k == want[-1]:
            break
    return [kept[i] for i in want]


def _frames_in_order(path, error):
    """Yield the decoded frames of every video stream of the file (its cover pictures and each track) from the start,
    in the order the original's demux-and-decode loop listed them, to the end, where the empty packet demux() ends
    each stream with flushes the frames its decoder holds back. At the first packet a decoder refuses (where the
    original's loop raised) it ends as OpenCV's read() does: its exception appended to `error`, the frames held back
    never returned. The file is opened afresh: a raw stream (.h264) cannot seek back to its start."""
    with av.open(path) as container:
        video_stream(container)  # one decoder thread each: the frames of two tracks come out in the original's order
        for packet in container.demux(container.streams.video):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                error.append(e)
                return
            yield from frames


def frame_rgb(frame, upright=False):
    """A decoded frame -> RGB uint8 [H, W, 3], converted as the original's extraction converted it: PyAV's
    `frame.to_image()` (swscale to RGB24 with PyAV's defaults: bilinear chroma upsampling, the frame's colorspace);
    `to_ndarray` makes the same call without the PIL image (equal values, tested on 8- and 10-bit, 4:2:0 and 4:2:2,
    odd sizes). OpenCV converts otherwise (bicubic, into BGR): 0 apart on 8-bit 4:2:0 clips of even sides, but up
    to 21 / 255 on odd sides and 27 / 255 on 10-bit.
    upright: a phone's portrait video is stored landscape with a rotation in its display matrix, which players and
    OpenCV apply; the original's extraction did not (such a clip came out on its side), so it is applied only when
    asked for (the extraction tool's and predict.py's --upright): turn_upright."""
    # one swscale thread: parallelism belongs to the caller, and the pool of threads swscale starts by default for
    # every conversion, left in a frame awaiting the garbage collector, hung a process forked from this one (its
    # collector waited for threads only the parent had)
    rgb = frame.to_ndarray(format='rgb24', threads=1)
    if not upright:
        return rgb
    matrix = next((struct.unpack('=9i', bytes(sd)) for sd in frame.side_data if sd.type.name == 'DISPLAYMATRIX'), None)
    return rgb if matrix is None else np.ascontiguousarray(turn_upright(rgb, matrix))


def turn_upright(rgb, m):
    """[H, W, 3] as FFmpeg's player and tools show a frame of display matrix `m` (9 ints, 16.16 fixed point):
    their autorotate's turns and flips, so a mirrored matrix is mirrored (PyAV's frame.rotation calls a
    horizontal mirror a turn by 180 degrees, which OpenCV applies: upside down). An angle that is not a quarter
    turn is left as stored."""
    scale = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if not all(scale):
        return rgb
    theta = -round(-math.degrees(math.atan2(m[1] / scale[1], m[0] / scale[0])))  # av_display_rotation_get, negated
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if theta == 90:  # transpose: clockwise, or (a mirror) the plain transposition
        return rgb.transpose(1, 0, 2) if m[3] > 0 else np.rot90(rgb, -1)
    if theta == 270:  # counter-clockwise, or (a mirror) the transposition across the other diagonal
        return np.rot90(rgb, 2).transpose(1, 0, 2) if m[3] < 0 else np.rot90(rgb, 1)
    if theta == 180:
        return rgb[::-1 if m[4] < 0 else 1, ::-1 if m[0] < 0 else 1]
    return rgb[::-1] if theta == 0 and m[4] < 0 else rgb


def video_stream(container):
    """-> (the file's video track, to read by seeking, or None; how many cover pictures the file holds). Every video
    stream gets one decoder thread. The original's loop decoded every packet of the file into one list of frames:
    a cover picture (an attached_pic stream, as a download's embedded thumbnail) was a frame of it, before the
    video's first (FFmpeg reads it first), which `pick` counts; a file of several video tracks (a one-frame still
    track, a second camera) gave the frames of all, interleaved: then there is no one track to seek in (None), and
    read_video decodes the file as the original did."""
    for s in container.streams.video:
        s.codec_context.thread_count = 1
    tracks = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    return tracks[0] if len(tracks) == 1 else None, len(container.streams.video) - len(tracks)


def pick(count, n_frames, path, covers=0):
    """The frames the original's extraction kept of a video of `count` frames at `path` whose file holds `covers`
    cover pictures: sample_inside of its list, which began with the covers (video_stream), as indices of the video's
    own frames; None when it kept a cover (2 covers or more, or count < n_frames), which only decoding the file
    gives. BadVideo when the list has fewer than n_frames frames."""
    if count + covers < n_frames:
        have = f'{count} frame{"s" * (count != 1)}' + (f' and {covers} cover picture{"s" * (covers != 1)}' if covers else '')
        raise BadVideo(f'{path}: {have}, fewer than the {n_frames} asked for')
    chosen = sample_inside(count + covers, n_frames)
    return None if chosen[0] < covers else [i - covers for i in chosen]


def _seek_decode(container, stream, targets, keys, upright=False):
    """-> the RGB frames with timestamps `targets` (ascending), or None when one is not where the index says.
    `keys` = (pts, dts) of the keyframes, ascending. Seeks only when the next target's keyframe lies beyond
    what has been decoded, and to the keyframe's decoding timestamp: demuxers that index by dts (AVI) would
    land on a later keyframe if given its presentation timestamp. On the way to a target the decoder skips
    non-reference frames: no other frame depends on them, so what it returns is unchanged."""
    codec, want, out, packets, last = stream.codec_context, set(targets), {}, None, None
    for t in targets:
        if t in out:
            continue
        key_pts, key_dts = max([k for k in keys if k[0] <= t], default=keys[0])
        if packets is None or last is None or key_pts > last:
            container.seek(key_dts, stream=stream, backward=True)
            packets = container.demux(stream)
        for packet in packets:
            codec.skip_frame = 'DEFAULT' if packet.pts in want else 'NONREF'
            for f in codec.decode(packet):
                last = f.pts
                if f.pts in want:
                    out[f.pts] = frame_rgb(f, upright)
            if t in out:
                break
        else:
            return None
    return [out[t] for t in targets]


class BadKey(BadSample, KeyError):
    """A required key is missing from a sample's entry."""
    __str__ = BaseException.__str__  # KeyError would quote the message


def video_b64(path, sample, upright=False):
    """-> ([frame_b64] of read_video's `sample` frames, None), or (None, reason) when the file cannot be read: what
    _tools/extract_video-frame.py stores of one video (here, in an importable module, so that the tool's worker
    processes find it under any start method: spawn on macOS, forkserver from Python 3.14 on). An image (IMAGE_EXTS:
    CC3M's photos, sample 1) is one frame: a JPEG file is stored as its own bytes (no second lossy encoding; training
    decodes them as they are), after decoding once to be sure it can be."""
    try:
        frames = read_video(path, sample, upright)
    except BadVideo as e:
        return None, str(e)
    if is_image(path):
        with open(path, 'rb') as f:
            raw = f.read()
        if raw[:2] == b'\xff\xd8':
            return [base64.b64encode(raw).decode('ascii')], None
    return [frame_b64(rgb) for rgb in frames], None


def frame_b64(rgb):
    """An RGB uint8 array [H, W, 3] -> a frame as the frame files store it: RGB JPEG with PIL's defaults, base64
    ASCII (the original's extraction; b64_to_img reads it)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG')
    return base64.b64encode(buf.getvalue()).decode('ascii')


def b64_to_img(b64, size, reduce=False):
    """base64 image -> float [3, size, size] in [0, 1] (pad_resize of the decoded RGB). JPEGs take the fast
    tensor path (within 1/255 of the original's PIL path but at rare single values, tested; see pad_resize), anything
    else goes through PIL.
    With reduce (the fast_decode key), a JPEG at least 4x the target size is decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg itself (straight from the DCT, still at least twice `size` on its long side, so the antialiased resize
    still filters): the padding and the resize then work on a small image (1.2-1.5x faster on HD frames), but values
    move by more than 1/255 (measured in README, tested); so it is not the default."""
    return pad_resize(decode_image(b64_bytes(b64), size if reduce else 0), size)


def b64_bytes(b64):
    """A stored frame's base64 text (str or bytes) -> its bytes. Line breaks and spaces inside are allowed
    (base64.encodebytes and MIME tools write a line break every 76 characters, and the original's b64decode skipped
    them); any other character outside the alphabet is refused (binascii.Error), where the original dropped it and
    decoded what was left."""
    try:
        return base64.b64decode(b64.strip(), validate=True)
    except binascii.Error:
        return base64.b64decode((b'' if isinstance(b64, bytes) else '').join(b64.split()), validate=True)


def decode_image(raw, reduce_for=0):
    """The one image decoder: the bytes of an image file -> RGB uint8 [3, H, W]. JPEGs through torchvision's
    decode_jpeg, anything else through PIL. reduce_for=size: b64_to_img's reduce."""
    jpeg = raw[:2] == b'\xff\xd8'
    small = reduce_for and jpeg_side(raw) >= 4 * reduce_for
    pil = Image.open(io.BytesIO(raw)) if not jpeg or decode_jpeg is None or small else None
    if pil is None:
        return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if jpeg and small:
        w, h = pil.size
        side = 2 * reduce_for  # long side >= 2 size
        pil.draft('RGB', (-(-side * w // max(w, h)), -(-side * h // max(w, h))))
    return torch.from_numpy(rgb_array(pil)).permute(2, 0, 1)


def rgb_array(pil):
    """A PIL image -> RGB uint8 [H, W, 3], as PIL's convert('RGB') gives it, except for 16-bit grey (PNG, TIFF),
    which convert('RGB') clips at 255 (a white frame): it is scaled to 8 bits. 32-bit or float values, which have
    no one 8-bit reading, are refused."""
    if pil.mode.startswith('I;16'):
        grey = np.rint(np.asarray(pil, dtype=np.float32) * (255 / 65535)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if pil.mode in ('I', 'F'):
        raise ValueError(f'a {"32-bit integer" if pil.mode == "I" else "floating-point"} image (PIL mode {pil.mode}): '
                         f'save it with 8 or 16 bits per channel')
    return np.array(pil.convert('RGB'))


def jpeg_side(raw):
    """The long side of a JPEG from its frame header (SOF marker), without decoding; 0 when not found."""
    i = 2
    while i + 9 < len(raw) and raw[i] == 0xFF:
        marker, length = raw[i + 1], int.from_bytes(raw[i + 2:i + 4], 'big')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: precision, height, width
            return max(int.from_bytes(raw[i + 5:i + 7], 'big'), int.from_bytes(raw[i + 7:i + 9], 'big'))
        i += 2 + length
    return 0


PIL_BELOW = 1.4  # sweeps of padded sides from size to 4 size (random noise, size 64-448): 2/255 at 40 sizes under
# 1.4x (up to 21 values a frame), at 2 sizes past it (1 value in 3 frames; README, Benchmark)


def pad_resize(img, size):
    """RGB uint8 [3, H, W] -> float [3, size, size] in [0, 1], as the reference: zero-pad the short side by
    (long-short)//2 on both ends (TV.transforms.Pad, so an odd difference stays 1 px non-square), bilinear
    resize to size x size (PIL-like, antialiased), ToTensor. Every frame of training, evaluation and
    prediction goes through it (the model normalises with the ImageNet mean and std itself). A frame that is
    enlarged or shrunk by less than 1.4x (its padded short side under 1.4 `size`) is resized by PIL itself, the
    original's arithmetic to the bit: torch's uint8 kernel keeps fewer bits of its weights, which when enlarging
    moves values by up to 2/255, and at some ratios under 1.4 single values by 2/255 (e.g. 280 -> 224); past 1.4x
    that is rare (PIL_BELOW)."""
    h, w = img.shape[1:]
    if max(h, w) - abs(w - h) % 2 < PIL_BELOW * size:  # (the padded short side: the long one, 1 less for an odd difference)
        return torch.from_numpy(pil_pad_resize(img.permute(1, 2, 0).numpy(), size)).permute(2, 0, 1).float() / 255
    if w > h:
        # the resize is separable, a horizontal pass then a vertical one (as PIL's): rows of padding are zero
        # after the horizontal pass too, so it runs on the content alone and the narrower result is padded
        # (bit-identical to padding first, faster)
        img = zero_pad(resize(img, [h, size]), (w - h) // 2, 0)
    else:
        img = zero_pad(img, 0, (h - w) // 2)
    return resize(img, [size, size]).float() / 255


def pil_pad_resize(rgb, size):
    """RGB uint8 [H, W, 3] -> uint8 [size, size, 3] by the original's own arithmetic: zero rows (columns) of
    (long - short) // 2 on both sides of the short one, PIL's bilinear resize."""
    h, w = rgb.shape[:2]
    rows, cols = ((w - h) // 2, 0) if w > h else (0, (h - w) // 2)
    padded = np.zeros((h + 2 * rows, w + 2 * cols, 3), np.uint8)
    padded[rows:rows + h, cols:cols + w] = rgb
    return np.array(Image.fromarray(padded).resize((size, size), Image.BILINEAR))


def resize(img, hw):
    """uint8 [C, H, W] -> uint8 [C, *hw], bilinear and antialiased as PIL's: a horizontal pass, rounding to uint8,
    then a vertical one. torch's own uint8 kernel, on every CPU: torchvision's resize casts to float (one rounding
    at the end: up to 2/255 from PIL's) where it does not take the CPU for one with that kernel (torch's capability
    DEFAULT; AVX512 too in torchvision 0.23 and before), and so would pad_resize."""
    # the batch axis strided past the whole image: torch then keeps a channels-last input's layout in its output
    # (given img[None], it allocates a contiguous one and repacks into it; pytorch issue 68430)
    batch = img.as_strided((1, *img.shape), (img.numel(), *img.stride()))
    return torch.nn.functional.interpolate(batch, size=hw, mode='bilinear', antialias=True, align_corners=False)[0]


def zero_pad(img, rows, cols):
    """Zero rows above and below, zero columns left and right of [C, H, W], in the channels-last layout the
    decoders give (F.pad would make it channels-first, and the uint8 resize is about twice as fast on
    channels-last: 0.39 -> 0.21 ms for pad_resize of a 480x360 frame; the same values either way)."""
    if not rows and not cols:
        return img
    c, h, w = img.shape
    out = img.new_zeros(h + 2 * rows, w + 2 * cols, c).permute(2, 0, 1)
    out[:, rows:rows + h, cols:cols + w] = img
    return out


def tokenize(tokzr, s, size_txt):
    """Text -> (token ids [size_txt] padded / truncated, mask [size_txt] = ids != [PAD]), int64 numpy."""
    txt = np.array(tokzr.encode(s, padding='max_length', max_length=size_txt, truncation=True), dtype=np.int64)
    return txt, (txt != 0).astype(np.int64)


_TOKENIZERS = {}


def has_words(tokzr, s):
    """Whether s tokenises to a word piece: an empty text (white space, zero-width or control characters, lone
    accents) gives [CLS] [SEP] alone. (Tokenised only when no letter or digit settles it.)"""
    return any(c.isalnum() for c in s) or bool(tokzr.tokenize(s))


def get_tokenizer(backbone, vocab=''):
    """The BERT tokenizer of `vocab` (a vocab.txt file or a tokenizer directory) or, when it is '', of `backbone`
    (a transformers id or directory). It must fit the model: the vocabulary size of backbone's BERT config and
    the special ids of SPECIAL_IDS; anything else is a ValueError naming the source and what is wrong (a
    directory without vocabulary would otherwise give a 5-token tokenizer that maps every word to [UNK])."""
    key = (cache_key(backbone), cache_key(vocab))
    if key not in _TOKENIZERS:
        import transformers
        src = vocab or config.local_dir(backbone, 'txt_backbone')
        if vocab and not os.path.exists(vocab):
            raise FileNotFoundError(f'txt_vocab: no vocabulary at {vocab} (a vocab.txt or a tokenizer directory)')
        if os.path.isdir(src) and not any(os.path.isfile(os.path.join(src, f)) for f in ('vocab.txt', 'tokenizer.json')):
            raise DataError(f'{src} has no tokenizer vocabulary (vocab.txt or tokenizer.json): put the model\'s '
                            f'vocab.txt there, or name it with the config key txt_vocab (a vocab.txt or tokenizer dir)')
        n_vocab = bert_config(backbone).vocab_size  # first: a model id found nowhere is named as such
        if os.path.isfile(src):
            tok = transformers.BertTokenizer(vocab=src)
        else:  # (a cache holding the config but not vocab.txt gives a tokenizer of the 5 special tokens alone)
            tok = config.pretrained(transformers.BertTokenizer.from_pretrained, src, 'txt_backbone', lambda t: len(t) > 5)
            if len(tok) <= 5 and not os.path.isdir(src):
                raise FileNotFoundError(f'txt_backbone: the Hugging Face cache of {src!r} holds no tokenizer vocabulary '
                                        f'(vocab.txt), and it could not be fetched: fetch it once where there is '
                                        f'network, or name a vocab.txt with the config key txt_vocab')
        wrong = [f'{t} is id {tok.convert_tokens_to_ids(t)}, expected {i}' for t, i in SPECIAL_IDS.items()
                 if tok.convert_tokens_to_ids(t) != i]
        if len(tok) != n_vocab:
            wrong.insert(0, f'{len(tok)} tokens, but the BERT config of {backbone} has vocab_size {n_vocab}')
        if wrong:
            raise DataError(f'tokenizer {src} does not fit the model (txt_vocab / txt_backbone): ' + '; '.join(wrong))
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def cache_key(name):
    """A model id, or a path that exists made absolute: './_data/bert-tiny' read from one directory is not another
    directory's (after a chdir the first one's tokenizer and config were returned)."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if name and os.path.exists(path) else name


def bert_config(backbone):
    """The transformers BertConfig of txt_backbone (read once per process and directory)."""
    return _bert_config(cache_key(backbone))


@functools.lru_cache(maxsize=8)
def _bert_config(backbone):
    import transformers
    return config.pretrained(transformers.BertConfig.from_pretrained, config.local_dir(backbone, 'txt_backbone'),
                             'txt_backbone')


def check_size_txt(args):
    """size_txt must fit the text embedder's position table (BERT's max_position_embeddings, 512 for bert-base):
    past it the first step failed inside transformers, after the run's folder was made."""
    limit = bert_config(args['txt_backbone']).max_position_embeddings
    if args['size_txt'] > limit:
        raise DataError(f"config error: key 'size_txt' is {args['size_txt']}, but the text embedder of "
                        f"{args['txt_backbone']} has {limit} positions (max_position_embeddings): at most {limit}")


def need_file(path, hint=''):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'missing data file: {path}{hint}')
    return path


def read_text(path):
    """config.read_text (UTF-8, a BOM dropped), its refusal a DataError."""
    try:
        return config.read_text(path)
    except config.FileError as e:
        raise DataError(str(e)) from None


def load_json(path):
    try:
        return json.loads(read_text(need_file(path)))
    except json.JSONDecodeError as e:  # its message has the line and column, not the file
        raise DataError(f'{path}: not valid JSON ({e})') from e


class UnsafePickle(DataError, pickle.UnpicklingError):
    """A pickled data file refers to something other than plain data (a class, a function such as os.system)."""


class DataUnpickler(pickle.Unpickler):
    """Plain data only: the builtin containers, str, bytes and numbers are pickle opcodes; the only globals
    allowed are those that rebuild numpy arrays, dtypes and scalars (and the helpers protocol 2 uses for bytes
    and sets). Any other global is refused before it is looked up, so nothing in the file can run."""
    ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for n in ('_reconstruct', 'scalar')} | {
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'), ('numpy', 'ndarray'),
        ('numpy', 'dtype'), ('_codecs', 'encode'), ('collections', 'OrderedDict')} | {
        (m, n) for m in ('builtins', '__builtin__') for n in ('set', 'frozenset', 'bytearray', 'complex')}

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UnsafePickle(f'{self.path}: refused to unpickle {module}.{name}: a data file may hold only dicts, '
                               f'lists, tuples, sets, str, bytes, numbers and numpy arrays (reading anything else could run code)')
        return super().find_class(module, name)


def load_pickle(path):
    """A pickled data file -> its object (plain data only, see DataUnpickler); errors name the file."""
    with open(need_file(path), 'rb') as f:
        try:
            return DataUnpickler(f, path).load()
        except UnsafePickle:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
            raise DataError(f'{path}: not a readable pickle (truncated or another format?): '
                             f'{type(e).__name__}: {e}') from e


class WriteError(Exception):
    """A file could not be written (disk full, quota, read-only, permission): the message names it and why."""


def write_atomic(path, write):
    """write(tmp) into a temporary file beside `path`, flush it to disk (fsync), rename it over `path`: after a crash
    or kill -9 at any moment `path` holds the old file or the new one, whole; a kill leaves a stale X.tmp<pid>.
    Every data file, checkpoint and log of the project is written through here. When the write fails (the disk
    fills up, a quota, permission, a read-only disk) the temporary file is removed (half a checkpoint would keep
    the disk full), `path` is as it was, and WriteError names the file, the reason and the space left on its disk.
    write(tmp) writes the file at tmp itself; its failure must carry the OS's error (OSError), also as the cause or
    context of another exception (write_torch)."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # (KeyboardInterrupt too: the temporary file goes in every case)
        written = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):  # (never in place of the error being raised)
                os.remove(tmp)
        why = os_error(e) if isinstance(e, (OSError, RuntimeError)) else None
        if why is None:  # not a failed write (a bug in write, an interrupt): raised as it is
            raise
        raise write_error(path, why, written) from e
    if hasattr(os, 'O_DIRECTORY'):  # the rename itself reaches the disk with the directory's entry
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_error(path, why, written=0):
    """WriteError naming the file, the OS's reason, how much of it was written and the space left on its disk."""
    return WriteError(f'could not write {path}: {why} ' + (f'(after {size_text(written)} of it; ' if written else '(')
                      + f'{disk_free(path)} free on its disk)')


def remove_stale_tmp(folder, prefix=''):
    """Remove the temporary files (X.tmp<pid>) that a kill left in `folder`, of names starting with `prefix`.
    Called by the one process that writes there (a run holding its folder's lock, an extraction of its outputs)."""
    stale = sorted(f for f in os.listdir(folder) if f.startswith(prefix) and re.fullmatch(r'.+\.tmp\d+', f))
    for f in stale:
        os.remove(os.path.join(folder, f))
    if stale:
        print(f'{folder}: removed {len(stale)} temporary file(s) of interrupted writes: {", ".join(stale)}', flush=True)


def os_error(e):
    """The OS's reason ('No space left on device') of an exception or of one in its chain (torch wraps the OSError
    of a failed write in a RuntimeError); None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.strerror or str(e)
        e = e.__cause__ or e.__context__
    return None


def make_folder(path):
    """os.makedirs(path, exist_ok=True) -> '', or why the folder cannot be made (a file in its way, permission, a
    read-only disk)."""
    try:
        os.makedirs(path, exist_ok=True)
        return ''
    except OSError as e:
        return 'a file is in its way' if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)


def disk_free(path):
    try:
        return size_text(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)
    except OSError:
        return 'unknown space'


def size_text(n):
    unit = next(u for u in range(3, -1, -1) if n >= 1024 ** u or u == 0)
    return f'{n / 1024 ** unit:.1f} {("bytes", "KB", "MB", "GB")[unit]}' if unit else f'{n} bytes'


def write_json(obj, path, indent=None):
    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=indent)
    write_atomic(path, write)


def write_pickle(obj, path):
    def write(tmp):
        with open(tmp, 'wb') as f:
            pickle.dump(obj, f)
    write_atomic(path, write)


def write_torch(obj, path):
    def write(tmp):
        try:
            torch.save(obj, tmp)  # given a path, torch writes twice as fast as through a Python file
            return
        except RuntimeError:  # ... but its error says nothing of why ("unexpected pos"): once more through a Python
            pass  # file, whose failed write raises the OS's error; outside this block, so that the first writer
        with open(tmp, 'wb') as f:  # (held by the first error's frames) has closed its file and freed its space
            torch.save(obj, f)
    write_atomic(path, write)


def json_key(obj, key, path):
    if not isinstance(obj, dict):  # (a list was a TypeError, or the whole file in the message)
        raise DataError(f'{path}: holds a JSON {type(obj).__name__}, not an object with a "{key}" key')
    if key not in obj:
        raise MissingKey(f'{path}: no key "{key}" (has {sorted(obj)[:10]})')
    return obj[key]


def read_lineidx(path):
    """A .lineidx: the byte offset of each line of its TSV, one a line."""
    lineidx = []
    for n, line in enumerate(read_text(need_file(path)).splitlines(), 1):
        if line.strip():
            try:
                lineidx.append(int(line))
            except ValueError:
                raise DataError(f'{path} line {n}: {line[:40]!r} is not a byte offset (a damaged index? it holds '
                                f'where each line of its .tsv starts, one decimal number a line)') from None
    if not lineidx:
        raise DataError(f'{path}: no video (an empty part or index)')
    return lineidx


def common_frame_count(counts, where):
    """{video: frame count} of a sample of videos -> the count most of them have. The sampled videos with another
    count (bad samples later) are named in one line, so a short first video cannot make the healthy ones bad."""
    (common, _), = collections.Counter(counts.values()).most_common(1)
    odd = [v for v, c in counts.items() if c != common]
    if odd:
        say(f'{where}: {len(odd)} of {len(counts)} sampled videos do not have the common {common} frames: ' +
            ', '.join(f'"{v}" ({counts[v]})' for v in odd[:5]) + (' ...' if len(odd) > 5 else ''))
    return common


def check_frames(count, where):
    """The frame count of a set's videos, found in `where`; a DataError past what the model embeds (it failed in the
    first training step)."""
    if count > MAX_FRAMES:
        raise DataError(f'{where}: its videos have {count} frames; VIOLET takes at most {MAX_FRAMES} (emb_len): '
                        f'extract at most {MAX_FRAMES} per video (--sample)')
    return count


def spread(items, n=32):
    """Up to n of items, evenly spread over them (a sample that is not only the start of a file)."""
    items = list(items)
    return items[::max(1, len(items) // n)][:n]


LAYOUT_SUFFIXES = dict(pkl=['.pkl'], v2=['.tsv', '.id2lineidx.pkl'], tsv=['.tsv', '.lineidx'])


def find_layout(prefix, layout='auto'):
    """The frame files of a downstream set X = `prefix`, in one of three layouts:
      'pkl': X.pkl = {vid: [b64, ...]} (the original's release);
      'v2':  X.tsv rows `vid \t <unused> \t b64 \t b64 ...` + X.id2lineidx.pkl = {vid: byte offset of its row}
             (VIOLETv2's release; more frames stored than used, see sample_stored);
      'tsv': X.tsv rows `vid \t b64 \t b64 ...` + X.lineidx (the byte offset of each row, one per line).
    'auto' takes the first whose files are all present, in that order. -> (layout, [paths])."""
    if layout == 'auto':
        layout = next((k for k, ends in LAYOUT_SUFFIXES.items() if all(os.path.isfile(prefix + e) for e in ends)), None)
        if layout is None:
            raise FileNotFoundError(f'missing data file: {prefix}.pkl (or {prefix}.tsv + .id2lineidx.pkl, '
                                    f'or {prefix}.tsv + .lineidx)')
    elif layout not in LAYOUT_SUFFIXES:
        raise ValueError(f'frame_layout must be one of {list(FRAME_LAYOUTS)}, got {layout!r}')
    return layout, [need_file(prefix + e) for e in LAYOUT_SUFFIXES[layout]]


def load_id2lineidx(path):
    id2lineidx = load_pickle(path)
    # (numpy integers too: an index built with numpy, e.g. np.cumsum of the line lengths)
    if not isinstance(id2lineidx, dict) or not all(isinstance(o, (int, np.integer)) for o in id2lineidx.values()):
        raise DataError(f'{path}: expected a dict video id -> byte offset (int)')
    return {k: int(o) for k, o in id2lineidx.items()}


def collate_skip(batch):
    """-> (default_collate of the non-None samples or None if all were bad, number of None samples)."""
    good = [b for b in batch if b is not None]
    return (default_collate(good) if good else None), len(batch) - len(good)


class TSV:
    """Random access to the lines of a .tsv by byte offset. The file opens lazily in each process (DataLoader
    workers, DDP ranks), and is never pickled."""

    def __init__(self, path):
        self.path, self._f, self.pid = need_file(path), None, None

    def __getstate__(self):
        return dict(path=self.path, _f=None, pid=None)

    def __del__(self):  # (left to the garbage collector, a handle warned 'unclosed file' once per part)
        if getattr(self, '_f', None) is not None and self.pid == os.getpid():  # (none when __init__ found no file)
            self._f.close()

    @property
    def f(self):
        """This process's handle (a forked worker or DDP rank opens its own on first use)."""
        if self.pid != os.getpid():
            self._f, self.pid = open(self.path, 'rb'), os.getpid()
        return self._f

    def read(self, offset):
        """-> the fields of the line starting at byte `offset`."""
        self.f.seek(max(offset - 1, 0))
        before = self.f.read(1) if offset > 0 else b'\n'
        line = self.f.readline()
        if not line:
            raise BadSample(f'{self.path}: offset {offset} is past the end of the file')
        if before != b'\n':
            raise BadSample(f'{self.path}: offset {offset} is not the start of a line')
        try:
            return line.decode('utf-8').rstrip('\n').split('\t')
        except UnicodeDecodeError as e:
            raise BadSample(f'{self.path}: the line at offset {offset} is not UTF-8 text (byte {line[e.start]:#x} at '
                            f'{offset + e.start}): a damaged file?') from None

    FULL_CHECK_BYTES = 1 << 30  # a TSV up to this size has every line start compared with its index

    def check_index(self, lineidx, path_index):
        """The index must list every line of the TSV, in order: one of an older or another file, or one that lost a
        line, would leave lines out of training without a word. The last indexed line must end the file; a TSV up
        to FULL_CHECK_BYTES (about a second to read) has every line start compared with the index; a larger one
        (a pretraining part) has its offsets checked to ascend and 32 indexed lines spread over it read, each of
        which must end where the next indexed line starts."""
        hint = 'a line dropped from the index, or an index of another version of the file?'
        self.f.seek(max(lineidx))
        self.f.readline()
        end, size = self.f.tell(), os.path.getsize(self.path)
        if end < size:
            raise DataError(f'{path_index}: its last line ends at byte {end} of {self.path} ({size} bytes): the lines '
                            f'after it are not indexed (an index of another version of the file?)')
        offsets = np.asarray(lineidx, dtype=np.int64)
        if size <= self.FULL_CHECK_BYTES:
            starts = self.line_starts()
            n = min(len(starts), len(offsets))
            differ = np.flatnonzero(starts[:n] != offsets[:n])
            if len(differ) or len(starts) != len(offsets):
                i = int(differ[0]) if len(differ) else n
                if i == len(starts):
                    raise DataError(f'{path_index}: entry {i} (byte {offsets[i]}) is past the last of the '
                                    f'{len(starts)} lines of {self.path} ({hint})')
                got = f'byte {offsets[i]}' if i < len(offsets) else 'missing'
                raise DataError(f'{path_index}: entry {i} is {got}, but line {i} of {self.path} starts at byte '
                                f'{starts[i]} ({hint})')
            return
        back = np.flatnonzero(np.diff(offsets) <= 0)
        if len(back):
            i = int(back[0]) + 1
            raise DataError(f'{path_index}: entry {i} (byte {offsets[i]}) does not come after entry {i - 1} '
                            f'(byte {offsets[i - 1]}): the offsets of a TSV\'s lines ascend ({hint})')
        for i in spread(range(len(offsets) - 1)):
            self.f.seek(offsets[i])
            end = offsets[i] + len(self.f.readline())
            if end != offsets[i + 1]:
                raise DataError(f'{path_index}: the line at entry {i} (byte {offsets[i]}) of {self.path} ends at byte '
                                f'{end}, but entry {i + 1} is byte {offsets[i + 1]} ({hint})')

    def line_starts(self):
        """-> the byte offset of every line of the file, int64 (reads it all, in 16 MiB chunks)."""
        self.f.seek(0)
        starts, pos = [np.zeros(1, np.int64)], 0
        while chunk := self.f.read(1 << 24):
            starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(chunk)
        starts = np.concatenate(starts)
        return starts[starts < pos]  # the end of the last line starts none

    def first_field(self, offset):
        """-> the first field (video id) of the line at `offset`, reading only up to its first tab."""
        self.f.seek(offset)
        head = b''
        while b'\t' not in head and b'\n' not in head:
            chunk = self.f.read(256)
            if not chunk:
                break
            head += chunk
        return head.split(b'\t')[0].split(b'\n')[0].decode('utf-8')


class Dataset_Base(torch.utils.data.Dataset):
    def __init__(self, args):
        self.args = {**DEFAULTS, **args}
        self.size_img, self.size_txt = self.args['size_img'], self.args['size_txt']
        self.path_data = self.args['path_data']
        self.tokzr = get_tokenizer(self.args['txt_backbone'], self.args['txt_vocab'])
        check_size_txt(self.args)
        self.frames, self.path_frames, self.size_frame, self.layout = None, None, None, None
        self.failures = None  # the extraction's failures, read when a video is missing (why_missing)

    def path(self, name):
        return os.path.join(self.path_data, name)

    def str2img(self, b64):
        return b64_to_img(b64, self.size_img, reduce=self.args['fast_decode'])

    def str2txt(self, s):
        return tokenize(self.tokzr, s, self.size_txt)

    def has_words(self, s):
        return has_words(self.tokzr, s)

    def open_frames(self, dataset):
        """The frames of img_<dataset> in its layout (find_layout; TSV rows are read on demand)."""
        self.layout, paths = find_layout(self.path(f'img_{dataset}'), self.args['frame_layout'])
        self.path_frames = paths[0]
        if self.layout == 'pkl':
            self.frames = load_pickle(paths[0])
            if not isinstance(self.frames, dict):
                raise DataError(f'{paths[0]}: holds a {type(self.frames).__name__}, not a dict video id -> [frames]')
        elif self.layout == 'v2':
            self.tsv, self.frames = TSV(paths[0]), load_id2lineidx(paths[1])
        else:
            self.tsv, lineidx = TSV(paths[0]), read_lineidx(paths[1])
            self.tsv.check_index(lineidx, paths[1])
            self.frames = {self.tsv.first_field(o): o for o in lineidx}
        if len(self.frames) == 0:
            raise DataError(f'{self.path_frames}: no videos')

    def why_missing(self, vid):
        """' (why)' when the extraction tool's list of failures beside the frames file names `vid`, or when `vid`
        is a file name whose extension the ids lack, else ''."""
        stem = os.path.splitext(vid)[0]
        if stem != vid and stem in self.frames:
            return f' (the ids are file names without their extension: "{stem}")'
        if vid.strip() != vid and vid.strip() in self.frames:
            return f' (there is "{vid.strip()}": the id has white space around it)'
        other = next((f for f in ('NFC', 'NFD') if unicodedata.normalize(f, vid) in self.frames), None)
        if other and not vid.isascii():  # (macOS writes file names decomposed, NFD; typed text is mostly NFC)
            return (f' (there is one of the same letters in another Unicode form, {other}: macOS writes file names '
                    f'decomposed; normalise the ids of the texts or of the frames file to one form)')
        path = os.path.splitext(self.path_frames)[0] + '.failed.json'
        if self.failures is None:
            self.failures = {}
            failed = load_json(path) if os.path.isfile(path) else {}
            if isinstance(failed, dict) and isinstance(failed.get('failed'), dict):
                self.failures = {os.path.splitext(os.path.basename(p))[0]: why for p, why in failed['failed'].items()}
        return f' (its extraction failed, {path}: {self.failures[vid]})' if vid in self.failures else ''

    def frames_b64(self, vid):
        """-> every frame stored for `vid` (base64 strings)."""
        if vid not in self.frames:
            raise BadSample(f'{self.path_frames}: no video "{vid}"{self.why_missing(vid)}')
        if self.layout == 'pkl':
            frames = self.frames[vid]
            if isinstance(frames, (str, bytes)) or not isinstance(frames, (list, tuple, np.ndarray)):
                raise BadSample(f'{self.path_frames}: video "{vid}" holds a {type(frames).__name__}, not a list of '
                                f'frames (base64 JPEG)')
            return frames
        fields = self.tsv.read(self.frames[vid])
        if fields[0] != vid:
            raise BadSample(f'{self.path_frames}: line at offset {self.frames[vid]} is "{fields[0]}", not "{vid}"')
        return fields[2:] if self.layout == 'v2' else fields[1:]

    def decode_frames(self, b64s, vid, where):
        if len(b64s) != self.size_frame:
            raise BadSample(f'{where}: video "{vid}" has {len(b64s)} frames, expected {self.size_frame}')
        img = []
        for i, b in enumerate(b64s):
            if not isinstance(b, (str, bytes)):
                raise BadSample(f'{where}: video "{vid}" frame {i} is a {type(b).__name__}, not base64 text')
            try:
                img.append(self.str2img(b))
            except IMAGE_ERRORS as e:
                raise BadSample(f'{where}: video "{vid}" frame {i}: cannot decode image ({image_error(e)})') from e
        return torch.stack(img)

    def get_img(self, vid):
        """-> float [T, 3, S, S] in [0, 1] (downstream frames file). In the v2 layout, T = size_frame of the
        stored frames, by sample_stored (the training rule for the 'train' split)."""
        b64s = self.frames_b64(vid)
        if self.layout == 'v2':
            if len(b64s) < self.size_frame:
                raise BadSample(f'{self.path_frames}: video "{vid}" has {len(b64s)} frames, '
                                f'fewer than size_frame {self.size_frame}')
            b64s = [b64s[i] for i in sample_stored(len(b64s), self.size_frame, self.split == 'train', self.draws)]
        return self.decode_frames(b64s, vid, self.path_frames)

    draw_seed = 0  # the training unit's (tasks.Downstream.train_set)
    draws = random  # an item's random draws (VIOLETv2's frame sampling): its own generator in __getitem__

    def __getitem__(self, idx):
        # seeded by the unit and the item, not drawn from the process's RNG: a DataLoader worker's state is not
        # in resume.pt, so a resumed run drew other frames than an unbroken one from its stop on
        self.draws = random.Random(f'{self.draw_seed} {idx}')
        try:
            return self.get_item(idx)
        except BadSample:
            if self.args['skip_bad']:
                return None
            raise


class Dataset_Pretrain(Dataset_Base):
    """-> (img [T,3,S,S], txt [X], mask [X], vq [T*(1+h*w)] int64 with -1 at each frame's cls slot; 0 at every
    patch under mvm_target 'pixel')."""

    def __init__(self, args, dataset, split, part=None):
        super().__init__(args)
        self.dataset, self.split = dataset, split
        path_txt = self.path(f'txt_{dataset}.json')
        self.path_txt = path_txt
        self.txt = load_captions(path_txt, split)
        name = f'img_{dataset}_{split}_{part}' if split == 'train' else f'img_{dataset}_{split}'
        self.tsv = TSV(self.path(name + '.tsv'))
        self.path_lineidx = self.path(name + '.lineidx')
        self.lineidx = read_lineidx(self.path_lineidx)
        self.tsv.check_index(self.lineidx, self.path_lineidx)
        self.path_vq = self.path(f'vq_{dataset}.pkl')
        if self.args.get('mvm_target', 'vq') == 'pixel':  # the targets come from the frames: no VQ file is read
            self.vq = None
            counts = {}
            for i in spread(range(len(self.lineidx))):
                try:
                    counts[f'line {i}'] = len(self.tsv.read(self.lineidx[i])) - 1
                except BadSample:
                    continue  # named when the sample is read
            self.size_frame = check_frames(common_frame_count(counts, self.tsv.path) if counts else 0, self.tsv.path)
            return
        need_file(self.path_vq, ' (the MVM targets: _tools/extract_vq.py writes them with the DALL-E encoder; without '
                                'it, mvm_target "pixel" predicts the frames\' pixels, VIOLETv2\'s)')
        self.vq = load_pickle(self.path_vq)
        if not isinstance(self.vq, dict):
            raise DataError(f'{self.path_vq}: holds a {type(self.vq).__name__}, not a dict video id -> VQ tokens')
        if len(self.vq) == 0:
            raise DataError(f'{self.path_vq}: empty')
        counts = {vid: len(self.vq[vid]) if hasattr(self.vq[vid], '__len__') else -1 for vid in spread(self.vq)}
        T = common_frame_count(counts, self.path_vq)
        vid = next(vid for vid, n in counts.items() if n == T)
        first = self.vq_tokens(vid, f'{self.path_vq}: video "{vid}"', DataError)
        hw = self.size_img // 32
        if first.ndim != 3 or first.shape[1:] != (hw, hw):
            raise DataError(f'{self.path_vq}: VQ tokens of shape {first.shape}, expected [T, {hw}, {hw}] for '
                             f'size_img {self.size_img} (extract with _tools/extract_vq.py --frame={self.size_img})')
        self.size_frame = check_frames(first.shape[0], self.path_vq)

    def __len__(self):
        return len(self.lineidx)

    def vq_tokens(self, vid, where, error):
        """The VQ tokens of `vid` as int64 [T, h, w]: an integer array [T, h, w] or a list of T [h, w] (as releases
        store them; floats too when every value is whole); anything else (fractions would be truncated in silence,
        ragged lists, None) is an `error`."""
        try:
            vq = np.asarray(self.vq[vid])
        except ValueError as e:  # (ragged nested lists)
            raise error(f'{where}: VQ tokens that are not one array ({e})') from None
        if vq.dtype.kind not in 'iu' and not (vq.dtype.kind == 'f' and np.array_equal(vq, np.round(vq))):
            raise error(f'{where}: VQ tokens of type {vq.dtype}' + (', not whole numbers' if vq.dtype.kind == 'f' else
                        ', not integers') + ' (DALL-E token ids, _tools/extract_vq.py)')
        return vq.astype(np.int64)

    def get_item(self, idx):
        fields = self.tsv.read(self.lineidx[idx])
        vid = fields[0]
        where = f'{self.tsv.path} line {idx} (offset {self.lineidx[idx]})'
        img = self.decode_frames(fields[1:], vid, where)
        if vid not in self.txt:
            raise BadSample(f'{self.path_txt}["{self.split}"]: no caption for video "{vid}" ({where})')
        txt, mask = self.str2txt(first_caption(self.txt[vid], f'{self.path_txt}["{self.split}"]["{vid}"]', where,
                                               self.has_words))
        hw = self.size_img // 32
        if self.vq is None:  # pixel targets: a placeholder token 0 per patch
            vq = np.zeros((self.size_frame, hw, hw), dtype=np.int64)
        elif vid not in self.vq:
            raise BadSample(f'{self.path_vq}: no VQ tokens for video "{vid}" ({where})')
        else:
            vq = self.vq_tokens(vid, f'{self.path_vq}: video "{vid}"', BadSample)
            if vq.shape != (self.size_frame, hw, hw):
                raise BadSample(f'{self.path_vq}: video "{vid}" has VQ tokens of shape {vq.shape}, '
                                f'expected {(self.size_frame, hw, hw)}')
            if vq.min() < 0 or vq.max() >= VQ_VOCAB:
                raise BadSample(f'{self.path_vq}: video "{vid}" has VQ tokens outside 0..{VQ_VOCAB - 1} '
                                f'(min {vq.min()}, max {vq.max()})')
        vq = np.concatenate([np.full((self.size_frame, 1), -1, dtype=np.int64), vq.reshape(self.size_frame, -1)], 1)
        return img, txt, mask, vq.reshape(-1)


EMPTY = 'empty (only [CLS] [SEP] would be left of it: no words to learn from or match)'


def load_captions(path_txt, split):
    """txt_<dataset>.json[split] of a pretraining set: {video id: caption or [captions]}; a DataError naming the file
    when it is not a dict (a downstream list of items made every video 'without a caption')."""
    captions = json_key(load_json(path_txt), split, path_txt)
    if not isinstance(captions, dict):
        raise DataError(f'{path_txt}: "{split}" is a {type(captions).__name__}, not a dict video id -> caption(s) '
                        f'(a list of items is the downstream format)')
    return captions


def first_caption(caps, key, where, has_words):
    """A pretraining video's captions (a string or a list of them) -> the first, the one trained on; BadSample
    naming `key` (its place in txt_<dataset>.json) and `where` (its line) when there is none or it has no words.
    (A bare string is one caption: the original took its first character, a caption of one letter.)"""
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or len(caps) == 0 or not isinstance(caps[0], str):
        raise BadSample(f'{key}: {caps!r:.60} is not a caption or a non-empty list of captions ({where})')
    if not has_words(caps[0]):
        raise BadSample(f'{key}: the caption is {EMPTY} ({where})')
    return caps[0]


def count_parts(args, dataset):
    """Number of training parts img_<dataset>_train_<k>.tsv present, k = 0, 1, ... (contiguous)."""
    path_data = {**DEFAULTS, **args}['path_data']
    k = 0
    while os.path.isfile(os.path.join(path_data, f'img_{dataset}_train_{k}.tsv')):
        k += 1
    # a part after a gap would never be trained: say so instead of finishing without it
    pattern = re.compile(rf'img_{re.escape(dataset)}_train_(\d+)\.tsv')
    later = sorted(int(m[1]) for f in (os.listdir(path_data) if os.path.isdir(path_data) else [])
                   if (m := pattern.fullmatch(f)) and int(m[1]) > k)
    if later:
        raise FileNotFoundError(f'missing data file: {os.path.join(path_data, f"img_{dataset}_train_{k}.tsv")} '
                                f'(the parts are numbered from 0 without gaps; img_{dataset}_train_{later[0]}.tsv exists)')
    return k


class Dataset_Downstream(Dataset_Base):
    """Frames of args['dataset'], items txt_<args['task']>.json[split]."""

    def __init__(self, args, split):
        super().__init__(args)
        self.split = split
        self.path_txt = self.path(f'txt_{self.args["task"]}.json')
        self.json = load_json(self.path_txt)
        self.txt = json_key(self.json, split, self.path_txt)
        if not isinstance(self.txt, list):  # a dict (pretraining's video -> caption) failed in item() with KeyError: 0
            raise DataError(f'{self.path_txt}: "{split}" is a {type(self.txt).__name__}, not a list of items '
                            f'{{"video": ..., ...}} (a dict of video -> caption is the pretraining format)')
        self.open_frames(self.args['dataset'])
        if self.layout == 'v2':  # size_frame of the stored frames are sampled
            if self.args['size_frame'] < 1:
                raise DataError(f'{self.path_frames}: the VIOLETv2 layout stores more frames than are used; '
                                 f'set size_frame (VIOLETv2 uses 5)')
            self.size_frame = self.args['size_frame']
            return
        counts = self.frame_counts()
        self.size_frame = self.args['size_frame'] or check_frames(common_frame_count(counts, self.path_frames),
                                                                  self.path_frames)
        if self.size_frame not in counts.values():  # (a typo: every video would be a bad sample)
            raise DataError(f"config error: key 'size_frame' is {self.size_frame}, but none of {len(counts)} sampled "
                            f"videos of {self.path_frames} has that many frames (they have "
                            f"{', '.join(map(str, sorted(set(counts.values()))))}; size_frame 0 takes their count)")

    def frame_counts(self):
        """{video: frame count} of a sample of the frames file's videos."""
        counts = {}
        for vid in spread(self.frames):
            try:
                counts[vid] = len(self.frames_b64(vid))
            except BadSample:
                continue  # named when the sample is read
        if not counts:
            raise DataError(f'{self.path_frames}: none of {len(spread(self.frames))} sampled videos could be read')
        return counts

    def __len__(self):
        return len(self.txt)

    words = ()  # the keys of an item whose text must not be empty (a sample without it means nothing)

    def keys(self):
        """The keys every item of the task has."""
        return ('video',) + self.words

    def check_items(self):
        """Every item has the task's keys, its video is in the frames file, no text of `words` is empty, and every
        answer is in range (the items' other faults are named when they are read)."""
        lacking = [i for i, it in enumerate(self.txt) if isinstance(it, dict) and any(k not in it for k in self.keys())]
        if lacking:
            item = self.txt[lacking[0]]
            key = next(k for k in self.keys() if k not in item)
            hint = (f'; size_option is {self.args["size_option"]}' if key.startswith('option_') and 'option_0' in item
                    else f'; its keys are {", ".join(map(str, item))}: the texts of another task?'
                    if len(lacking) == len(self.txt) else '')
            raise BadKey(f'{self.path_txt}["{self.split}"][{lacking[0]}]: no key "{key}"{hint}'
                         + (f' ({len(lacking) - 1} more of the split\'s items lack a key)' if len(lacking) > 1 else ''))
        missing = [(i, it['video']) for i, it in enumerate(self.txt)
                   if isinstance(it, dict) and isinstance(it.get('video'), str) and it['video'] not in self.frames]
        if missing:
            (idx, vid), more = missing[0], len(missing) - 1
            raise BadSample(f'{self.path_txt}["{self.split}"][{idx}]: no video "{vid}" in {self.path_frames}'
                            + self.why_missing(vid) + (f' ({more} more of the split\'s items lack theirs)' if more else ''))
        typed = [i for i, it in enumerate(self.txt) if not isinstance(it, dict)
                 or any(not isinstance(it[k], str) for k in self.keys() if k != 'answer')]
        if typed:  # (a question stored as a list was found when read, in the first evaluation)
            self.item(typed[0], *self.keys())
        if self.layout == 'pkl':  # (a test video of another frame count was found after an epoch of training)
            odd = [(i, it['video']) for i, it in enumerate(self.txt) if isinstance(self.frames[it['video']], (list, tuple))
                   and len(self.frames[it['video']]) != self.size_frame]  # (other kinds: bad samples, when read)
            if odd:
                (idx, vid), more = odd[0], len(odd) - 1
                raise BadSample(f'{self.path_txt}["{self.split}"][{idx}]: video "{vid}" has '
                                f'{len(self.frames[vid])} frames in {self.path_frames}, expected {self.size_frame}'
                                + (f' ({more} more of the split\'s videos)' if more else ''))
        empty = [i for i, it in enumerate(self.txt) if isinstance(it, dict)
                 and any(isinstance(it.get(k), str) and not self.has_words(it[k]) for k in self.words)]
        if empty:
            self.item(empty[0], *self.words, more=f' ({len(empty) - 1} more of the split\'s items have an empty text)'
                      if len(empty) > 1 else '')
        if self.answer_range:
            wrong = [i for i, it in enumerate(self.txt)
                     if isinstance(it, dict) and 'answer' in it and not answer_ok(it['answer'], *self.answer_range)]
            if wrong:
                self.answer(wrong[0], self.txt[wrong[0]],
                            more=f' ({len(wrong) - 1} more of the split\'s answers out of range)' if len(wrong) > 1 else '')

    answer_range = ()  # (classes, whether -1 is allowed) of a task with answers

    def item(self, idx, *keys, more=''):
        """Item idx, which must have `keys`; every key but 'answer' must hold a string, not empty for `words`."""
        item, where = self.txt[idx], f'{self.path_txt}["{self.split}"][{idx}]'
        if not isinstance(item, dict):
            raise BadSample(f'{where}: {type(item).__name__} {item!r:.60}, not an object')
        for k in keys:
            if k not in item:
                raise BadKey(f'{where}: no key "{k}"')
            if k != 'answer' and not isinstance(item[k], str):
                raise BadSample(f'{where}: "{k}" is {type(item[k]).__name__} {item[k]!r:.60}, not a string')
            if k in self.words and not self.has_words(item[k]):
                raise BadSample(f'{where} (video "{item.get("video")}"): "{k}" is {EMPTY}{more}')
        return item

    def answer(self, idx, item, more=''):
        """The int answer of item idx in 0..n-1, (n, unknown_ok) = answer_range; with unknown_ok, also -1 (QA-OE: not
        in the answer vocabulary)."""
        a, (n, unknown_ok) = item['answer'], self.answer_range
        if not answer_ok(a, n, unknown_ok):
            # an answer written as its text (by hand): say which index it is
            texts = getattr(self, 'answers', None) or [item.get(f'option_{i}') for i in range(n)]
            hint = f' (an answer is the index of its text: "{a}" is {texts.index(a)})' if isinstance(a, str) and a in texts else ''
            raise BadSample(f'{self.path_txt}["{self.split}"][{idx}] (video "{item.get("video")}"): '
                            f'answer {a!r} not in 0..{n - 1} ({self.answer_source}){hint}{more}')
        return int(a)


def answer_ok(a, n, unknown_ok=False):
    """An int in 0..n-1 (or -1 with unknown_ok); a bool is not an answer."""
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool) and (0 <= a < n or (unknown_ok and a == -1))


class Dataset_QAMC(Dataset_Downstream):
    """-> (img [T,3,S,S], txt [O,X], mask [O,X], answer); text i = question + ' ' + option_i, i < size_option;
    answer -1: none of the options (no loss in training, wrong in evaluation, as the original)."""
    no_answer = ('none of the options', 'the index of the right option')

    def __init__(self, args, split):
        super().__init__(args, split)
        self.size_option = self.args['size_option']
        self.words = tuple(f'option_{i}' for i in range(self.size_option))
        self.answer_range = (self.size_option, True)  # -1: none of them (the original's ignore_index)
        self.answer_source = f'size_option {self.size_option}; -1: none of them'
        # an empty question is allowed (caption-choice sets such as MSRVTT-MC have none: the options alone are
        # scored), but said, once per split
        empty = [i for i, it in enumerate(self.txt)
                 if isinstance(it, dict) and isinstance(it.get('question'), str) and not self.has_words(it['question'])]
        if empty:
            say(f'{self.path_txt}["{split}"]: {len(empty)} of {len(self.txt)} items have an empty "question" (first '
                f'[{empty[0]}], video "{self.txt[empty[0]].get("video")}"): their options are scored alone')

    def keys(self):
        return ('video', 'question', 'answer') + self.words

    def get_item(self, idx):
        item = self.item(idx, *self.keys())
        answer = self.answer(idx, item)
        img = self.get_img(item['video'])
        txt, mask = zip(*[self.str2txt(item['question'] + ' ' + item[f'option_{i}']) for i in range(self.size_option)])
        return img, np.stack(txt), np.stack(mask), answer


def answer_texts(vocab, where, blank=False):
    """A "vocab" entry of a txt_*.json -> the answer texts by class index. A list is that already; a dict maps
    answer -> index. blank: a list may hold null (None) for a class without a text (a run's vocab.json)."""
    if isinstance(vocab, dict):
        texts = [None] * len(vocab)
        for a, i in vocab.items():
            if not isinstance(i, int) or not 0 <= i < len(vocab) or texts[i] is not None:
                raise DataError(f'{where}: "vocab" maps {a!r} to {i!r}, not a distinct index in 0..{len(vocab) - 1}')
            texts[i] = a
        return texts
    if not isinstance(vocab, list):
        raise DataError(f'{where}: "vocab" must be a list of answers (or answer -> index), got {type(vocab).__name__}')
    odd = next((i for i, a in enumerate(vocab) if not (isinstance(a, (str, int, float)) or blank and a is None)
                or isinstance(a, bool)), None)
    if odd is not None:  # (a list or null became the answer text "['red', 'RED']" or "None")
        raise DataError(f'{where}: "vocab"[{odd}] is {vocab[odd]!r:.40}, not an answer text')
    return [None if a is None else str(a) for a in vocab]


class Dataset_QAOE(Dataset_Downstream):
    """-> (img, txt, mask, answer) with answer < size_vocab (args['size_vocab'], else len of the json's "vocab"),
    or -1: an answer outside the vocabulary (no loss in training, wrong in evaluation)."""
    words = ('question',)
    no_answer = ('not in the vocabulary', 'its class index (of its text in "vocab")')

    def __init__(self, args, split):
        super().__init__(args, split)
        key = 'ans2label' if 'ans2label' in self.json and 'vocab' not in self.json else 'vocab'  # VIOLETv2's name
        if isinstance(self.json, dict) and key not in self.json:
            if not self.args.get('size_vocab'):
                raise MissingKey(f'{self.path_txt}: no key "vocab" (has {sorted(self.json)[:10]}): the answer texts by '
                                 f'class index; without them, set size_vocab (the number of answer classes)')
            self.vocab = self.answers = None  # the original's way: answer indices alone (no vocab.json, no texts)
        else:
            self.vocab = json_key(self.json, key, self.path_txt)
            self.answers = answer_texts(self.vocab, self.path_txt)
        self.size_vocab = self.args.get('size_vocab') or len(self.answers)
        self.answer_range = (self.size_vocab, True)  # -1: not in the answer vocabulary
        self.answer_source = (f'size_vocab {self.size_vocab}' if self.args.get('size_vocab') else
                              f'the {self.size_vocab} answers of its "{key}"') + '; -1: not in it'

    def keys(self):
        return 'video', 'question', 'answer'

    def get_item(self, idx):
        item = self.item(idx, *self.keys())
        answer = self.answer(idx, item)
        txt, mask = self.str2txt(item['question'])
        return self.get_img(item['video']), txt, mask, answer


class Dataset_Retrieval(Dataset_Downstream):
    """-> (img, txt, mask) of item i; .txt is the list of {"video", "caption"} (eval_retrieval uses it)."""
    words = ('caption',)

    def get_item(self, idx):
        item = self.item(idx, *self.keys())
        txt, mask = self.str2txt(item['caption'])
        return self.get_img(item['video']), txt, mask
