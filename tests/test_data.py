"""Data side: offline tools (_tools/), dataset.py, the toy corpus. Small and CPU-only."""
import base64, binascii, contextlib, importlib.util, io, json, os, pickle, re, shutil, subprocess, sys, types, unicodedata

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as TV
import transformers
from PIL import Image
import av
import cv2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, '_tools')
sys.path.insert(0, TOOLS)
import dataset  # noqa: E402
import extract_tsv  # noqa: E402
import extract_vq  # noqa: E402
import make_toy  # noqa: E402

frame_tool = make_toy.load_frame_tool()
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning')


def run_tool(path, *argv, cwd=ROOT):
    """A tool's command line, run in this process (a subprocess spends seconds importing torch and the rest) ->
    its returncode, stdout and stderr, as subprocess.run gives them."""
    name = os.path.basename(path)[:-3].replace('-', '_')
    if name not in sys.modules:  # (by name, once: its process pool's workers find its functions)
        spec = importlib.util.spec_from_file_location(name, os.path.join(cwd, path))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    out, err, argv_before, cwd_before, code = io.StringIO(), io.StringIO(), sys.argv, os.getcwd(), 0
    sys.argv = [path, *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                sys.modules[name].main()
            except SystemExit as e:  # as Python ends a script: a message goes to stderr, with status 1
                code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
    finally:
        sys.argv = argv_before
        os.chdir(cwd_before)
    return types.SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope='module')
def tok_dir():
    """The repo's tiny BERT tokenizer dir (the real bert-base-uncased vocab.txt)."""
    return os.path.join(ROOT, '_data', 'bert-tiny')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('toy'))
    counts = make_toy.make_toy(out, seed=0, size_img=64, n_videos=6, n_val=4, n_images=5, n_down=8, n_down_eval=4,
                               workers=2)
    return out, counts


@pytest.fixture
def args(toy, tok_dir):
    return dict(path_data=toy[0], txt_backbone=tok_dir, size_img=64, size_txt=16)


def write_clip(path, colours, size=(80, 64)):
    """One solid-colour frame per entry of `colours` (BGR)."""
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 8, size)
    for c in colours:
        out.write(np.full((size[1], size[0], 3), c, np.uint8))
    out.release()


def b64_to_array(b):
    return np.array(Image.open(io.BytesIO(base64.b64decode(b))).convert('RGB'))


# ---- extract_video-frame

def test_frame_indices_on_numbered_frames(tmp_path):
    assert dataset.sample_inside(16, 5) == [2, 5, 8, 10, 13]
    assert dataset.sample_inside(3, 4) == [0, 1, 1, 2]  # fewer frames than asked: the original repeated them
    assert dataset.sample_inside(4, 4) == [0, 1, 2, 3]
    for n_frames, sample in [(16, 5), (13, 4), (7, 1), (4, 4)]:
        path = str(tmp_path / f'v{n_frames}.mp4')
        write_clip(path, [(k * 16, k * 16, k * 16) for k in range(n_frames)])  # frame k has grey level 16k
        frames = dataset.video_b64(path, sample)[0]
        got = [int(round(b64_to_array(b).mean() / 16)) for b in frames]
        n = n_frames / (sample + 1)
        assert got == [int(n * (i + 1)) for i in range(sample)]
    # a clip shorter than --sample is listed as failed, as predict.py refuses it (one rule: dataset.read_video)
    path = str(tmp_path / 'v3.mp4')
    write_clip(path, [(k * 16,) * 3 for k in range(3)])
    assert dataset.video_b64(path, 4) == (None, f'{path}: 3 frames, fewer than the 4 asked for')
    # RGB order: a red BGR frame comes out red
    write_clip(str(tmp_path / 'red.mp4'), [(0, 0, 255)] * 4)
    r, g, b = b64_to_array(dataset.video_b64(str(tmp_path / "red.mp4"), 1)[0][0]).mean((0, 1))
    assert r > 200 and g < 50 and b < 50


def write_av_clip(path, n, codec, options=None, size=(96, 64)):
    """A PyAV-encoded clip: frame k is grey level 7k mod 256 with a white band k px wide (every frame distinct)."""
    with av.open(path, 'w') as c:
        s = c.add_stream(codec, rate=25, options=options or {})
        s.width, s.height, s.pix_fmt = size[0], size[1], 'yuv420p'
        for k in range(n):
            img = np.full((size[1], size[0], 3), k * 7 % 256, np.uint8)
            img[:, :k % size[0]] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def original_frames(path):
    """Every frame as the original's extraction decoded it (_tools/extract_video-frame.py of the release: PyAV,
    every packet of the file demuxed and decoded, each video frame to_image().convert('RGB')), RGB arrays."""
    frames = []
    with av.open(path) as c:
        for packet in c.demux():
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    frames.append(np.array(frame.to_image().convert('RGB')))
    return frames


def opencv_frames(path):
    """Every frame OpenCV's read loop gives, RGB: the reference where the original's loop raises (a damaged file:
    OpenCV stops at the first packet the decoder refuses) and for rotation (OpenCV turns rotated videos upright)."""
    cap, out = cv2.VideoCapture(path), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return out
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.mark.parametrize('name, codec, options', [
    ('ocv.mp4', None, None),  # OpenCV's mp4v writer: every frame a keyframe
    ('x264.mp4', 'libx264', {'x264-params': 'bframes=3:keyint=10:b-adapt=0:scenecut=0'}),  # B-frames, GOPs of 10
    ('long_gop.mkv', 'libx264', {'x264-params': 'bframes=2:keyint=40'}),
    ('mpeg4.avi', 'mpeg4', {'bf': '2', 'g': '7'})])
def test_read_video_seeks_to_the_frames_of_a_full_decode(tmp_path, monkeypatch, name, codec, options):
    path = str(tmp_path / name)
    if codec is None:
        write_clip(path, [(k * 5,) * 3 for k in range(45)])
    else:
        write_av_clip(path, 61, codec, options)
    every = original_frames(path)
    assert len(every) in (45, 61)
    monkeypatch.setattr(dataset, '_decode_all', None)  # the fallback must not be what makes this pass
    for n in [1, 2, 3, 5, 8, 16, 44, len(every)]:
        got = dataset.read_video(path, n)
        assert len(got) == n
        for k, (a, i) in enumerate(zip(got, dataset.sample_inside(len(every), n))):
            assert np.array_equal(a, every[i]), f'{name}: n={n}, sample {k} is not frame {i}'
    with pytest.raises(dataset.BadVideo, match=f'{name}: {len(every)} frames, fewer than the {len(every) + 1} asked for'):
        dataset.read_video(path, len(every) + 1)
    monkeypatch.undo()  # the full-decode fallback (a target not found by seeking) gives the same frames
    seek_decode = dataset._seek_decode
    monkeypatch.setattr(dataset, '_seek_decode', lambda c, s, targets, keys, upright: seek_decode(c, s, [t + 0.5 for t in targets], keys, upright))  # never found
    got = dataset.read_video(path, 5)
    assert all(np.array_equal(a, every[i]) for a, i in zip(got, dataset.sample_inside(len(every), 5)))


@pytest.mark.parametrize('name', ['x264.avi', 'x264.wmv'])
def test_read_video_of_b_frames_in_a_container_without_display_order(tmp_path, name):
    """H.264 with B-frames in AVI or ASF (ffmpeg -c:v libx264 out.avi): the container keeps no presentation
    timestamps (they are made up in decoding order), so the packet index does not tell which frame is which: frames
    4, 10, 14, 20, 24 of 30 came out for 5, 10, 15, 20, 25, in training data and in predict.py. Such a file is
    decoded from the start, as the original decoded every file."""
    path = str(tmp_path / name)
    write_av_clip(path, 30, 'libx264', {'x264-params': 'bframes=2:keyint=10:b-adapt=0:scenecut=0'})
    every = original_frames(path)
    assert len(every) == 30
    for n in [1, 5, 12, 30]:
        assert all(np.array_equal(a, every[i]) for a, i in zip(dataset.read_video(path, n), dataset.sample_inside(30, n)))


@pytest.mark.parametrize('name, options', [('anim.webp', {'lossless': True}), ('anim.png', {})])
def test_read_video_of_an_animated_webp_or_png(tmp_path, name, options):
    """An animated WebP or PNG (APNG) is a video of its frames (FFmpeg reads neither's): it was refused as '1 frame
    (an image)', and with --sample 1 its first frame was kept in silence. A still PNG stays one frame."""
    frames = [Image.fromarray(np.full((48, 64, 3), 10 * i, np.uint8)) for i in range(12)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, **options)
    for n in (1, 5, 12):
        got = dataset.read_video(str(tmp_path / name), n)
        assert [int(f.mean()) // 10 for f in got] == dataset.sample_inside(12, n) and got[0].shape == (48, 64, 3)
    b64, why = dataset.video_b64(str(tmp_path / name), 5)
    assert why is None and [int(round(b64_to_array(b).mean() / 10)) for b in b64] == dataset.sample_inside(12, 5)
    with pytest.raises(dataset.BadVideo, match=f'{name}: 12 frames, fewer than the 13 asked for$'):
        dataset.read_video(str(tmp_path / name), 13)
    if name.endswith('.png'):  # an APNG's default image (a still for viewers without APNG) is not one of its frames
        still = Image.fromarray(np.full((48, 64, 3), 255, np.uint8))
        still.save(tmp_path / 'def.png', save_all=True, append_images=frames, default_image=True)
        for n in (1, 5, 12):
            got = dataset.read_video(str(tmp_path / 'def.png'), n)
            assert [int(f.mean()) // 10 for f in got] == dataset.sample_inside(12, n), n
    frames[3].save(tmp_path / 'still.png')
    assert len(dataset.read_video(str(tmp_path / 'still.png'), 1)) == 1
    with pytest.raises(dataset.BadVideo, match=r'still.png: 1 frame \(an image\), fewer than the 5 asked for$'):
        dataset.read_video(str(tmp_path / 'still.png'), 5)


def write_clip_with_still(path, n, still, n_stills=1):
    """A 96 x 64 x264 clip of n frames (write_av_clip's, B-frames) beside n_stills still pictures: 'cover', PNGs
    with the attached_pic disposition (a thumbnail embedded by a download tool; the mp4 muxer stores it as cover art
    after the video track), or 'track', one-frame MJPEG tracks before the video's (no disposition)."""
    with av.open(path, 'w') as c:
        pics = []
        for _ in range(n_stills if still == 'track' else 0):
            pics.append(c.add_stream('mjpeg', rate=1))
            pics[-1].width, pics[-1].height, pics[-1].pix_fmt = 96, 64, 'yuvj420p'
        s = c.add_stream('libx264', rate=25, options={'x264-params': 'bframes=2:keyint=8'})
        s.width, s.height, s.pix_fmt = 96, 64, 'yuv420p'
        for _ in range(n_stills if still == 'cover' else 0):
            pics.append(c.add_stream('png', rate=1))
            pics[-1].width, pics[-1].height, pics[-1].pix_fmt = 96, 64, 'rgb24'
            pics[-1].disposition = av.stream.Disposition.attached_pic
        for k in range(n):
            img = np.full((64, 96, 3), k * 7 % 256, np.uint8)
            img[:, :k] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        for j, pic in enumerate(pics):
            still_img = av.VideoFrame.from_ndarray(np.full((64, 96, 3), 200 + j, np.uint8), format='rgb24')
            for p in pic.encode(still_img.reformat(format=pic.pix_fmt)) + pic.encode():
                c.mux(p)


def write_two_tracks(path, n1, n2):
    """Two x264 video tracks of n1 and n2 frames (a second camera), their packets interleaved by time."""
    with av.open(path, 'w') as c:
        tracks = [c.add_stream('libx264', rate=25, options={'x264-params': 'bframes=2:keyint=8'}) for _ in range(2)]
        for s in tracks:
            s.width, s.height, s.pix_fmt = 96, 64, 'yuv420p'
        for k in range(max(n1, n2)):
            for j, (s, n) in enumerate(zip(tracks, (n1, n2))):
                if k < n:
                    img = np.full((64, 96, 3), (k * 7 + 100 * j) % 256, np.uint8)
                    img[:, :k] = 255
                    for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                        c.mux(p)
        for s in tracks:
            for p in s.encode():
                c.mux(p)


def test_read_video_counts_a_cover_picture_as_the_original(tmp_path, monkeypatch):
    """An mp4 with a cover picture: the original's loop decoded it as a frame at the head of its list (31 frames
    for 30), which moved every frame it chose; read_video chooses the same frames, by seeking and by decoding from
    the start, and the cover itself where the original kept it (31 of 31)."""
    path = str(tmp_path / 'covered.mp4')
    write_clip_with_still(path, 30, 'cover')
    every = original_frames(path)
    assert len(every) == 31 and every[0].mean() == 200  # the cover first
    for n in [1, 4, 5, 8, 30, 31]:
        want = [every[i] for i in dataset.sample_inside(31, n)]
        assert all(np.array_equal(a, b) for a, b in zip(dataset.read_video(path, n), want)), n
    with pytest.raises(dataset.BadVideo, match='covered.mp4: 30 frames and 1 cover picture, fewer than the 32 asked'):
        dataset.read_video(path, 32)
    monkeypatch.setattr(dataset, '_seek_decode', lambda *a: None)  # decoded from the start instead
    want = [every[i] for i in dataset.sample_inside(31, 5)]
    assert all(np.array_equal(a, b) for a, b in zip(dataset.read_video(path, 5), want))


@pytest.mark.parametrize('name, make', [
    ('still_first.mkv', lambda p: write_clip_with_still(p, 30, 'track')),   # a one-frame picture track first
    ('still_first.mp4', lambda p: write_clip_with_still(p, 30, 'track')),   # the same in mp4, where it is "default"
    ('two_covers.mp4', lambda p: write_clip_with_still(p, 7, 'cover', 2)),  # the original kept the second cover
    ('two_cameras.mp4', lambda p: write_two_tracks(p, 20, 30))])            # two tracks, interleaved
def test_read_video_of_several_video_streams_is_the_originals(tmp_path, name, make):
    """The original's loop listed the frames of every video stream of a file, in the order its decoders gave them:
    read_video samples that list. (It read FFmpeg's best stream alone: the mp4's still track, refused as a 1-frame
    video; the mkv's video track, frames one off the original's; one camera of two.)"""
    path = str(tmp_path / name)
    make(path)
    every = original_frames(path)
    assert len(every) in (31, 9, 50)
    for n in (3, 5):
        got = dataset.read_video(path, n)
        assert len(got) == n
        assert all(np.array_equal(a, every[i]) for a, i in zip(got, dataset.sample_inside(len(every), n))), n


def rotate_in_header(path, out, matrix):
    """A copy of an mp4 whose track header (tkhd, version 0) carries `matrix`: the display matrix a phone writes
    for a portrait video stored landscape."""
    raw = bytearray(open(path, 'rb').read())
    at = raw.find(b'tkhd') + 4 + 4 + 20 + 16  # version/flags, 5 fields, reserved, layer ... volume
    for i, v in enumerate(matrix):
        raw[at + 4 * i:at + 4 * i + 4] = (v & 0xFFFFFFFF).to_bytes(4, 'big')
    open(out, 'wb').write(bytes(raw))


@pytest.mark.parametrize('degrees, matrix', [(90, [0, 1 << 16, 0, -1 << 16, 0, 0, 0, 0, 1 << 30]),
                                             (180, [-1 << 16, 0, 0, 0, -1 << 16, 0, 0, 0, 1 << 30]),
                                             (270, [0, -1 << 16, 0, 1 << 16, 0, 0, 0, 0, 1 << 30])])
def test_read_video_keeps_a_rotated_video_as_the_original_unless_upright(tmp_path, degrees, matrix):
    """A phone's portrait video (stored 96 x 64 with a rotation in its header): by default its frames as the
    original's extraction stored them (as encoded, on their side); with upright=True turned as OpenCV and players
    show it, pixel for pixel."""
    write_av_clip(str(tmp_path / 'flat.mp4'), 12, 'libx264', size=(96, 64))
    rotate_in_header(str(tmp_path / 'flat.mp4'), str(tmp_path / 'phone.mp4'), matrix)
    stored, shown = original_frames(str(tmp_path / 'phone.mp4')), opencv_frames(str(tmp_path / 'phone.mp4'))
    assert stored[0].shape == (64, 96, 3) and shown[0].shape == ((64, 96, 3) if degrees == 180 else (96, 64, 3))
    assert not np.array_equal(stored[5], shown[5])  # frame 5: a white band on its left side
    pos = dataset.sample_inside(12, 5)
    got = dataset.read_video(str(tmp_path / 'phone.mp4'), 5)
    assert all(np.array_equal(a, stored[i]) for a, i in zip(got, pos))
    got = dataset.read_video(str(tmp_path / 'phone.mp4'), 5, upright=True)
    assert all(np.array_equal(a, shown[i]) for a, i in zip(got, pos))


@pytest.mark.parametrize('matrix, shown', [
    ([-1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30], lambda f: f[:, ::-1]),                   # x' = -x: mirrored
    ([1 << 16, 0, 0, 0, -1 << 16, 0, 0, 0, 1 << 30], lambda f: f[::-1]),                      # y' = -y: upside down
    ([0, 1 << 16, 0, 1 << 16, 0, 0, 0, 0, 1 << 30], lambda f: f.transpose(1, 0, 2)),          # x' = y, y' = x
    ([0, -1 << 16, 0, -1 << 16, 0, 0, 0, 0, 1 << 30], lambda f: f[::-1, ::-1].transpose(1, 0, 2))])  # x' = -y, y' = -x
def test_upright_mirrors_a_mirrored_video(tmp_path, matrix, shown):
    """A display matrix that mirrors (x' = -x, a selfie camera's): upright shows what the matrix says, as FFmpeg's
    autorotate does. PyAV's frame.rotation calls x' = -x a turn by 180 degrees (OpenCV applies that too): the frames
    came out upside down instead of mirrored."""
    write_av_clip(str(tmp_path / 'flat.mp4'), 12, 'libx264', size=(96, 64))
    rotate_in_header(str(tmp_path / 'flat.mp4'), str(tmp_path / 'mirror.mp4'), matrix)
    stored = original_frames(str(tmp_path / 'mirror.mp4'))
    got = dataset.read_video(str(tmp_path / 'mirror.mp4'), 5, upright=True)
    assert all(np.array_equal(a, shown(stored[i])) for a, i in zip(got, dataset.sample_inside(12, 5)))


def test_extraction_tool_upright_flag(tmp_path, monkeypatch, capsys):
    """The extraction tool stores a rotated clip as the original did (as encoded) and upright with --upright, through
    its worker pool too."""
    os.makedirs(tmp_path / 'v')
    write_av_clip(str(tmp_path / 'flat.mp4'), 12, 'libx264', size=(96, 64))
    rotate_in_header(str(tmp_path / 'flat.mp4'), str(tmp_path / 'v' / 'phone.mp4'), [0, 1 << 16, 0, -1 << 16, 0, 0, 0, 0, 1 << 30])
    shapes = {}
    for flags in ([], ['--upright']):
        out = str(tmp_path / f'out{len(flags)}.pkl')
        monkeypatch.setattr(sys, 'argv', ['tool', f'--videos={tmp_path / "v"}', f'--out={out}', '--sample=3',
                                          '--workers=2', *flags])
        frame_tool.main()
        shapes[len(flags)] = {b64_to_array(b).shape for b in dataset.load_pickle(out)['phone']}
    assert shapes == {0: {(64, 96, 3)}, 1: {(96, 64, 3)}}
    # a rerun into the output with the other --upright: refused (it skipped the videos there, leaving them on their
    # side beside new upright ones); with the same, it goes on
    write_av_clip(str(tmp_path / 'v' / 'more.mp4'), 12, 'libx264', size=(96, 64))
    for flags, said in (([], f'{tmp_path}/out1.pkl was written with --upright: give the same, or another --out'),
                        (['--upright'], None)):
        monkeypatch.setattr(sys, 'argv', ['tool', f'--videos={tmp_path / "v"}', f'--out={tmp_path}/out1.pkl',
                                          '--sample=3', *flags])
        if said:
            with pytest.raises(SystemExit, match=f'^{re.escape(said)}$'):
                frame_tool.main()
        else:
            frame_tool.main()
    assert sorted(dataset.load_pickle(str(tmp_path / 'out1.pkl'))) == ['more', 'phone']
    assert json.load(open(tmp_path / 'out1.extract.json')) == {'sample': 3, 'upright': True}


def test_extraction_interrupted_keeps_what_was_read(tmp_path, monkeypatch):
    """Ctrl-C during extraction: a KeyboardInterrupt traceback (one per worker too), and a pkl output lost every
    video read (it is written at the end). Now the videos read so far are written, one line says so, and the same
    command goes on with the others."""
    for k in range(4):
        write_clip(str(tmp_path / f'c{k}.mp4'), [(k * 40 + j * 10,) * 3 for j in range(6)])
    (tmp_path / 'b.mp4').write_bytes(b'')  # (its failure is listed too)
    real, calls = frame_tool.video_b64, []

    def read(path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, **kw)
    monkeypatch.setattr(frame_tool, 'video_b64', read)
    monkeypatch.setattr(sys, 'argv', ['tool', f'--videos={tmp_path}', f'--out={tmp_path}/o/img.pkl', '--sample=3',
                                      '--workers=1'])
    with pytest.raises(SystemExit, match=f'^interrupted: 1 videos written \\(0 were there before\\), 1 unreadable listed in '
                                         f'{tmp_path}/o/img.failed.json; the same command goes on with the others$'):
        frame_tool.main()
    assert sorted(dataset.load_pickle(f'{tmp_path}/o/img.pkl')) == ['c0']
    assert list(json.load(open(f'{tmp_path}/o/img.failed.json'))['failed']) == [f'{tmp_path}/b.mp4']
    frame_tool.main()
    assert sorted(dataset.load_pickle(f'{tmp_path}/o/img.pkl')) == ['c0', 'c1', 'c2', 'c3'] and len(calls) == 7


@pytest.mark.parametrize('name, codec, size, pix_fmt', [
    ('even.mp4', 'libx264', (96, 64), 'yuv420p'),       # the common case: swscale's 8-bit fast path
    ('odd.avi', 'mpeg4', (77, 45), 'yuv420p'),          # odd sides: PyAV's default conversion was 2 / 255 off
    ('deep.mp4', 'libx264', (96, 64), 'yuv420p10le'),   # 10-bit: 28 / 255 off (bilinear chroma, RGB-order dither)
    ('prores.mov', 'prores_ks', (96, 64), 'yuv422p10le')])
def test_read_video_converts_pixels_as_the_original(tmp_path, name, codec, size, pix_fmt):
    """Colour noise (chroma differs between neighbours, where upsampling filters disagree) in the formats cameras
    and editors write: the RGB frames equal the original extraction's (PyAV's to_image()), value for value. OpenCV's
    conversion (bicubic into BGR, used here until 2026-11-28) is 0 apart on even.mp4 but 21 / 255 on odd.avi, 27 on
    deep.mp4, 3 on prores.mov."""
    path, rng = str(tmp_path / name), np.random.default_rng(0)
    with av.open(path, 'w') as c:
        s = c.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt = size[0], size[1], pix_fmt
        for k in range(6):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    every = original_frames(path)
    assert len(every) == 6 and every[0].shape == (size[1], size[0], 3)
    got = dataset.read_video(path, 6)
    assert all(np.array_equal(a, b) for a, b in zip(got, every)), \
        max(np.abs(a.astype(int) - b).max() for a, b in zip(got, every))


def test_read_video_reads_damaged_and_raw_streams(tmp_path):
    """A download cut short (an mp4 with its index first, 'faststart', truncated): the original's loop stops with
    an error at its damage (and its whole extraction with it); here the frames are sampled from those decoded
    before it, as OpenCV's read loop gives them. A raw H.264 stream (no timestamps): the original's frames. Before,
    the packet index counted the frames lost in the cut, so other frames were sampled, and a raw stream was 'a
    corrupt video' (it cannot seek back to its start)."""
    def clip(path, **kw):
        with av.open(str(path), 'w', **kw) as c:
            s = c.add_stream('libx264', rate=25, options={'x264-params': 'keyint=10:bframes=2'})
            s.width, s.height, s.pix_fmt = 96, 64, 'yuv420p'
            for k in range(60):
                img = np.full((64, 96, 3), k * 4, np.uint8)
                img[:, :k] = 255
                for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    clip(tmp_path / 'whole.mp4', options={'movflags': 'faststart'})
    clip(tmp_path / 'raw.h264', format='h264')
    raw = (tmp_path / 'whole.mp4').read_bytes()
    (tmp_path / 'cut.mp4').write_bytes(raw[:int(len(raw) * 0.8)])
    (tmp_path / 'stub.mp4').write_bytes(raw[:int(len(raw) * 0.5)])
    with pytest.raises(av.InvalidDataError):
        original_frames(str(tmp_path / 'cut.mp4'))
    for name in ('cut.mp4', 'raw.h264'):
        every = (opencv_frames if name == 'cut.mp4' else original_frames)(str(tmp_path / name))
        # (cut: the frames after the cut and those the decoder held back are lost; 35 of 60 with the pinned FFmpeg)
        assert 5 <= len(every) < 59 if name == 'cut.mp4' else len(every) == 60
        got = dataset.read_video(str(tmp_path / name), 5)
        assert all(np.array_equal(a, every[i]) for a, i in zip(got, dataset.sample_inside(len(every), 5))), name
    left = len(opencv_frames(str(tmp_path / 'stub.mp4')))
    assert 0 < left < 5
    with pytest.raises(dataset.BadVideo, match=rf'^{tmp_path}/stub.mp4: a corrupt video, its frames cannot be decoded '
                                               rf'\(.*Invalid data.*\); the {left} before the damage are fewer than the 5'):
        dataset.read_video(str(tmp_path / 'stub.mp4'), 5)


def remux(src, dst, edit):
    """Copy the video stream of `src` into `dst` without re-encoding, its packets (those with data) edited by
    `edit(packets) -> packets`: the remuxes and cuts that leave real files without a clean packet index."""
    with av.open(src) as ic, av.open(dst, 'w') as oc:
        ist = ic.streams.video[0]
        ost = oc.add_stream_from_template(ist)
        for p in edit([p for p in ic.demux(ist) if p.size]):
            p.stream = ost
            oc.mux(p)


def test_read_video_two_frames_of_one_timestamp(tmp_path):
    """A stream that gives two frames the same timestamp (a remux gone wrong): the packet index cannot tell them
    apart, so the file is decoded from the start, as the original decoded every file; before, one frame stood for
    both."""
    src, dup = str(tmp_path / 'src.mkv'), str(tmp_path / 'dup.mkv')
    with av.open(src, 'w') as c:
        s = c.add_stream('mpeg4', rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        s.codec_context.gop_size = 5
        for k in range(20):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * 12, np.uint8), format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)

    def one_timestamp_twice(packets):
        packets[11].pts, packets[11].dts = packets[10].pts, packets[10].dts
        return packets
    remux(src, dup, one_timestamp_twice)
    every = original_frames(dup)
    assert len(every) == 20
    got = dataset.read_video(dup, 19)
    assert all(np.array_equal(a, every[i]) for a, i in zip(got, dataset.sample_inside(20, 19)))


@pytest.mark.parametrize('ext, params, cut_at, count', [
    ('mkv', 'bframes=0:keyint=20:scenecut=0', 'packet 5', 60),
    ('ts', 'bframes=0:keyint=20:scenecut=0', 'packet 5', 60),
    ('mkv', 'bframes=3:keyint=12:open-gop=1:scenecut=0', 'keyframe 2', 78)])
def test_read_video_of_a_stream_cut_without_reencoding(tmp_path, ext, params, cut_at, count):
    """A clip cut without re-encoding. Mid-GOP (at packet 5 of 80): the 15 packets before its first keyframe give no
    frame, so the original's loop counted 60 frames of 75 packets. At an open GOP's keyframe: the B-frames after
    it refer to the GOP cut away and give no frame either (78 of 81). Every n takes the original's frames; the
    packet index, which counts every packet, took others."""
    src, cut = str(tmp_path / 'src.mkv'), str(tmp_path / f'cut.{ext}')
    write_av_clip(src, 80 if cut_at == 'packet 5' else 90, 'libx264', {'x264-params': params})
    remux(src, cut, lambda packets: packets[5:] if cut_at == 'packet 5' else
          packets[[i for i, p in enumerate(packets) if p.is_keyframe][1]:])
    every = original_frames(cut)
    assert len(every) == count
    for n in [1, 4, 5, 8]:
        got = dataset.read_video(cut, n)
        assert all(np.array_equal(a, every[i]) for a, i in zip(got, dataset.sample_inside(count, n))), n


@pytest.mark.parametrize('name, codec, kind', [('long.mkv', 'libx264', 'a Matroska file'), ('long.avi', 'mpeg4', 'an AVI file')])
def test_read_video_names_a_cut_mkv_or_avi(tmp_path, name, codec, kind):
    """An MKV or AVI cut short (an interrupted download) was 'no frames' or 'not a video (Invalid data found ...)';
    its header's size names it, as an MP4's boxes did."""
    write_av_clip(str(tmp_path / name), 16, codec)
    raw = (tmp_path / name).read_bytes()
    assert dataset.cut_short(str(tmp_path / name)) is None
    for frac in (0.6, 0.2):
        (tmp_path / 'cut').mkdir(exist_ok=True)
        cut = tmp_path / 'cut' / name
        cut.write_bytes(raw[:int(len(raw) * frac)])
        with pytest.raises(dataset.BadVideo, match=re.escape(f'{cut}: {kind} cut short: {int(len(raw) * frac)} of the '
                                                             f'{len(raw)} bytes its header gives: an interrupted download')):
            dataset.read_video(str(cut), 5)


def test_cut_short_needs_a_known_size(tmp_path):
    """A RIFF size FFmpeg leaves unknown (0xFFFFFFFF or 0: written to a pipe), or a RIFF file that is not an AVI (a
    WAV), is no evidence of a cut: such an audio-only file was called 'an AVI file cut short' ('an WAVE file')."""
    for form, size in ((b'AVI ', 0xFFFFFFFF), (b'AVI ', 0), (b'WAVE', 10 ** 6)):
        (tmp_path / 'x.avi').write_bytes(b'RIFF' + size.to_bytes(4, 'little') + form + bytes(100))
        assert dataset.cut_short(str(tmp_path / 'x.avi')) is None
    (tmp_path / 'x.avi').write_bytes(b'RIFF' + (10 ** 6).to_bytes(4, 'little') + b'AVI ' + bytes(100))
    assert dataset.cut_short(str(tmp_path / 'x.avi')).startswith('an AVI file cut short: 112 of the 1000008 bytes')


def test_read_video_names_the_bad_file(tmp_path):
    write_clip(str(tmp_path / 'grey.mp4'), [(k * 16,) * 3 for k in range(9)], size=(48, 32))
    frames = dataset.read_video(str(tmp_path / 'grey.mp4'), 3)
    assert len(frames) == 3 and all(f.dtype == np.uint8 and f.shape == (32, 48, 3) for f in frames)
    assert [int(round(f.mean() / 16)) for f in frames] == [2, 4, 6]  # 9 / 4 = 2.25 -> 2, 4, 6
    (tmp_path / 'junk.mp4').write_bytes(b'not a video' * 10)
    (tmp_path / 'empty.mp4').write_bytes(b'')
    write_av_clip(str(tmp_path / 'x264.mp4'), 24, 'libx264')
    raw = bytearray((tmp_path / 'x264.mp4').read_bytes())
    raw[300:1500] = bytes((b * 7 + 13) % 256 for b in raw[300:1500])  # the frames' data damaged, the index intact
    (tmp_path / 'garbled.mp4').write_bytes(bytes(raw))
    # an mp4 with its index last (OpenCV's writer, like most encoders) cut short, before or inside its index: FFmpeg
    # says 'Invalid data', 'End of file' or finds no stream, depending on where; the message says what happened
    whole = (tmp_path / 'grey.mp4').read_bytes()
    moov = whole.index(b'moov') - 4
    (tmp_path / 'cut.mp4').write_bytes(whole[:moov - 10])
    (tmp_path / 'cut_index.mp4').write_bytes(whole[:moov + 50])
    (tmp_path / 'no_index.mp4').write_bytes(whole[:moov])
    # FFmpeg says 'Invalid data found when processing input' of all but the missing one: the message says which
    for name, what in [('junk.mp4', r'not a video \(.*Invalid data'), ('empty.mp4', r'an empty file \(0 bytes\)$'),
                       ('missing.mp4', 'no such file$'),
                       ('cut.mp4', r"an MP4 cut short: it ends 10 bytes short of the end of its 'mdat' box, before its "
                                   r"index \(moov\): an interrupted download or copy\?$"),
                       ('cut_index.mp4', r'an MP4 cut short: it ends \d+ bytes short of the end of its index \(the moov '
                                         r'box\): an interrupted download or copy\?$'),
                       ('no_index.mp4', r'an MP4 without its index \(no moov box\): an interrupted download or copy\?$'),
                       ('garbled.mp4', r'a corrupt video, its frames cannot be decoded \(.*Invalid data')]:
        with pytest.raises(dataset.BadVideo, match=f'^{tmp_path / name}: {what}'):
            dataset.read_video(str(tmp_path / name), 3)


def test_extract_cli_skips_unreadable_and_fails_when_nothing_read(tmp_path):
    vids = tmp_path / '_clips'
    vids.mkdir()
    write_clip(str(vids / 'a.mp4'), [(k * 20,) * 3 for k in range(10)])
    write_clip(str(vids / 'b.mp4'), [(k * 20,) * 3 for k in range(12)])
    (vids / 'broken.mp4').write_bytes(b'not a video' * 10)
    (vids / 'empty.mp4').write_bytes(b'')
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), f'--path={tmp_path}/clips', '--sample=5', '--workers=2')
    assert r.returncode == 0, r.stderr
    assert 'broken.mp4' in r.stderr and 'empty.mp4' in r.stderr and '2 unreadable' in r.stdout
    with open(tmp_path / 'clips.pkl', 'rb') as f:
        pkl = pickle.load(f)
    assert sorted(pkl) == ['a', 'b'] and all(len(v) == 5 and isinstance(v[0], str) for v in pkl.values())
    pkl2, bad = frame_tool.extract_dir(str(vids), 5, workers=1, progress=False)  # serial path, same result
    assert pkl2 == pkl and [os.path.basename(p) for p in bad] == ['broken.mp4', 'empty.mp4']

    # a video file for the folder, a --path whose _X folder is not there: said
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(vids / 'a.mp4'), '--sample=5',
                 f'--out={tmp_path}/x.pkl')
    assert r.stderr.strip() == (f'--videos {vids}/a.mp4 is a file: give the folder that holds the videos (predict.py '
                                f'reads single files)')
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), f'--path={tmp_path}/vids', '--sample=5')
    assert r.stderr.strip() == (f'no video folder {tmp_path}/_vids (--path {tmp_path}/vids reads the videos of _vids '
                                f'beside it, as the original; --videos names any folder)')

    bad_dir = tmp_path / '_junk'
    bad_dir.mkdir()
    (bad_dir / 'x.mp4').write_bytes(b'junk')
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), f'--path={tmp_path}/junk', '--sample=5',
                 f'--out={tmp_path}/junk_out.pkl')
    assert r.returncode != 0 and 'no video could be read' in r.stderr


def test_extract_recursive_webvid_layout(tmp_path):
    """WebVid's download: videos/<page_dir>/<videoid>.mp4. It was refused ('give each as --videos'), and a run per
    folder started a shard per folder; --recursive reads every folder below, each video named by its file name,
    into shards of --shard_size. An id in two folders: none of its files is kept, each listed (the first was kept:
    a text written for the other clip trained on it without a word)."""
    videos = tmp_path / 'videos'
    for page, ids in (('000001_000050', ('1066674784', '1066674799')), ('000051_000100', ('1058911', '9931'))):
        (videos / page).mkdir(parents=True)
        for k, vid in enumerate(ids):
            write_clip(str(videos / page / f'{vid}.mp4'), [(k * 40 + j * 10,) * 3 for j in range(6)])
    (videos / '.cache').mkdir()  # hidden folders are not read
    write_clip(str(videos / '.cache' / 'x.mp4'), [(0,) * 3] * 6)
    out = tmp_path / 'img_webvid2.5m_train'
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(videos), '--sample=4', '--recursive',
                 '--layout', 'tsv', '--shard_size', '3', '--out', str(out), '--workers=1')
    assert r.returncode == 0, r.stderr
    shards = [extract_tsv.read_tsv(f'{out}_{k}.tsv', f'{out}_{k}.lineidx') for k in (0, 1)]
    assert [list(sh) for sh in shards] == [['1058911', '1066674784', '1066674799'], ['9931']]
    assert all(len(f) == 4 for sh in shards for f in sh.values()) and 'folder(s) in it not read' not in r.stderr
    write_clip(str(videos / '000051_000100' / '1066674784.mp4'), [(9,) * 3] * 6)  # one id in two folders
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(videos), '--sample=4', '--recursive',
                 '--out', str(tmp_path / 'one.pkl'), '--workers=1')
    assert r.returncode == 0 and list(dataset.load_pickle(str(tmp_path / 'one.pkl'))) == [
        '1058911', '1066674799', '9931'], r.stderr
    failed = json.load(open(tmp_path / 'one.failed.json'))['failed']
    for here, there in (('000051_000100', '000001_000050'), ('000001_000050', '000051_000100')):
        said = (f'{videos}/{here}/1066674784.mp4: the same video id "1066674784" as {videos}/{there}/1066674784.mp4 '
                f'in another folder: none of them is kept (rename them)')
        assert f'skipped: {said}' in r.stderr and failed[f'{videos}/{here}/1066674784.mp4'] == said
    # an earlier run (the older rule kept one of them) left the id in the output: said
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(videos), '--sample=4', '--recursive',
                 '--layout', 'tsv', '--shard_size', '3', '--out', str(out), '--workers=1')
    assert r.returncode == 0 and ('note: video "1066674784" is in the output from an earlier run, though its files in '
                                  'several folders are all failed now: which clip it holds is unknown (another --out '
                                  'starts afresh)') in r.stderr, r.stderr


def test_extract_cli_folder_without_the_extension(tmp_path):
    """A folder of .avi files under the default --ext mp4 used to get an empty img_*.pkl and 'no video could be
    read'; now nothing is written and the message says which extensions the folder has. Extensions match in any
    case: a camera's C.MP4 is a video of --ext mp4."""
    (tmp_path / 'clips').mkdir()
    for name in ('a.avi', 'notes'):
        (tmp_path / 'clips' / name).write_bytes(b'x')
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(tmp_path / 'clips'), '--sample=5',
                 '--out', str(tmp_path / 'img_mine.pkl'))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f'no *.mp4 file in {tmp_path}/clips (it has .avi files: see --ext)'), r.stderr
    assert os.listdir(tmp_path) == ['clips']
    (tmp_path / 'clips' / 'more').mkdir()  # videos in folders below are not read: said
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(tmp_path / 'clips'), '--sample=5',
                 '--out', str(tmp_path / 'img_mine.pkl'))
    assert r.stderr.strip().splitlines()[-1] == (f'no *.mp4 file in {tmp_path}/clips (it has .avi files: see --ext) (it has '
                                                 f'1 folders: their videos are read with --recursive)')
    write_clip(str(tmp_path / 'clips' / 'C.MP4'), [(k * 20,) * 3 for k in range(10)])
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(tmp_path / 'clips'), '--sample=5',
                 '--out', str(tmp_path / 'img_mine.pkl'))
    assert r.returncode == 0, r.stderr
    assert list(dataset.load_pickle(str(tmp_path / 'img_mine.pkl'))) == ['C']
    # a folder named like a video: said so
    with pytest.raises(dataset.BadVideo, match=rf'^{tmp_path}/clips/more: a folder, not a video file$'):
        dataset.read_video(str(tmp_path / 'clips' / 'more'), 5)
    # more frames than VIOLET takes, outside the v2 layout: refused before the work
    r7 = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(tmp_path / 'clips'), '--sample=7',
                  '--out', str(tmp_path / 'img_7.pkl'))
    assert r7.returncode == 2 and 'error: --sample 7: VIOLET takes at most 6 frames a video; only the v2 layout' in r7.stderr
    # beside videos of its own too (it was said only when the folder had none)
    assert f'{tmp_path}/clips: 1 folder(s) in it not read (only its own files are): --recursive reads them' in r.stderr
    os.rmdir(tmp_path / 'clips' / 'more')
    # the files of other extensions are named (the .avi videos beside the .mp4 ones were left out without a word)
    assert f'{tmp_path}/clips: not read (not --ext mp4): 1 .avi, 1 without extension' in r.stderr
    # two files of one video id: the second would have replaced the first; it is listed as failed instead
    write_clip(str(tmp_path / 'clips' / 'C.avi'), [(k * 20,) * 3 for k in range(10)])
    os.remove(tmp_path / 'img_mine.pkl')
    r = run_tool(os.path.join(TOOLS, 'extract_video-frame.py'), '--videos', str(tmp_path / 'clips'), '--sample=5',
                 '--out', str(tmp_path / 'img_mine.pkl'), '--ext', 'mp4,avi', '--workers=1')
    assert r.returncode == 0 and '1 videos x 5 frames written, 0 already there; 2 unreadable skipped' in r.stdout, r.stderr
    failed = json.load(open(tmp_path / 'img_mine.failed.json'))['failed']
    assert failed[f'{tmp_path}/clips/C.avi'] == (f'{tmp_path}/clips/C.avi: the same video id "C" as {tmp_path}/clips/C.MP4 '
                                                 f'(rename one)')
    assert f'skipped: {tmp_path}/clips/C.avi: the same video id' in r.stderr
    assert 'not read (not --ext mp4,avi): 1 without extension\n' in r.stderr  # a.avi was read (and failed: not a video)


def test_extract_names_and_chooses_files_as_the_original(tmp_path):
    """The original globbed _X/*.mp4 and named each video .replace('.mp4', ''): clip.mp4.mp4 is video "clip"; hidden
    files (macOS's ._a.mp4 copies, .b.mp4) are not read, as glob skips them; of a.mp4 and a camera's a.MP4 (both
    video "a"), "a" is a.mp4, the file the original read (it was a.MP4, the first in byte order); a broken link is
    listed as failed, named (it was left out without a word)."""
    d = tmp_path / 'v'
    d.mkdir()
    write_clip(str(d / 'a.mp4'), [(k * 20, 0, 0) for k in range(10)])
    write_clip(str(d / 'a.MP4'), [(0, k * 20, 0) for k in range(10)])
    write_clip(str(d / 'clip.mp4.mp4'), [(0, 0, k * 20) for k in range(10)])
    write_clip(str(d / '.b.mp4'), [(k * 20,) * 3 for k in range(10)])
    (d / '._a.mp4').write_bytes(b'\x00\x05\x16\x07' + b'\x00' * 60)  # AppleDouble metadata, not a video
    os.symlink(d / 'gone.mp4', d / 'dead.mp4')
    assert [vid for vid, _ in frame_tool.list_videos(str(d))] == ['a', 'a', 'clip', 'dead']
    written, before, failed = frame_tool.extract_to(str(d), str(tmp_path / 'out.pkl'), 3, progress=False)
    stored = dataset.load_pickle(str(tmp_path / 'out.pkl'))
    assert sorted(stored) == ['a', 'clip'] and (written, before) == (2, 0)
    assert stored['a'] == dataset.video_b64(str(d / 'a.mp4'), 3)[0]
    assert failed == {f'{d}/a.MP4': f'{d}/a.MP4: the same video id "a" as {d}/a.mp4 (rename one)',
                      f'{d}/dead.mp4': f'{d}/dead.mp4: a broken link (to {d}/gone.mp4)'}


def test_extract_refuses_an_output_of_another_kind_and_names_with_tabs(tmp_path):
    """An existing --out that is not frames was merged into (a list: a traceback; {'x': 'abc'} with --sample 3 kept as a
    video); a file name with a tab stopped a TSV extraction after every video was decoded: it is listed as failed."""
    d = tmp_path / 'clips'
    d.mkdir()
    for name in ('a', 'b\tc'):
        write_clip(str(d / f'{name}.mp4'), [(k * 20,) * 3 for k in range(8)])
    for junk in ([1, 2], {'x': 'abc'}):
        with open(tmp_path / 'old.pkl', 'wb') as f:
            pickle.dump(junk, f)
        with pytest.raises(ValueError, match=rf'^{tmp_path}/old.pkl: (holds a list, not frames|video "x" holds str)'):
            frame_tool.extract_to(str(d), str(tmp_path / 'old.pkl'), 3, progress=False)
    written, before, failed = frame_tool.extract_to(str(d), str(tmp_path / 'img_t'), 3, layout='tsv', progress=False)
    assert (written, before) == (1, 0) and failed == {
        f'{d}/b\tc.mp4': f'{d}/b\tc.mp4: its name holds a tab or a newline, which end a TSV field or row (rename it)'}
    assert list(extract_tsv.read_tsv(str(tmp_path / 'img_t.tsv'), str(tmp_path / 'img_t.lineidx'))) == ['a']


# ---- extract_tsv

def test_tsv_lineidx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pkl = {f'vid_{i}': [base64.b64encode(rng.bytes(int(rng.integers(1, 300)))).decode() for _ in range(3)]
           for i in range(20)}
    with open(tmp_path / 'x.pkl', 'wb') as f:
        pickle.dump(pkl, f)
    r = run_tool(os.path.join(TOOLS, 'extract_tsv.py'), f'--path={tmp_path}/x')
    assert r.returncode == 0, r.stderr
    assert extract_tsv.read_tsv(str(tmp_path / 'x.tsv'), str(tmp_path / 'x.lineidx')) == pkl
    data = (tmp_path / 'x.tsv').read_bytes()
    offsets = [int(x) for x in (tmp_path / 'x.lineidx').read_text().split()]
    assert offsets == [0] + [i + 1 for i, c in enumerate(data) if c == ord('\n')][:-1]
    assert data.decode().splitlines()[3] == '\t'.join(['vid_3'] + pkl['vid_3'])


def test_tsv_from_pkls_as_released_and_damaged(tmp_path, toy):
    """Frames written by base64.encodebytes (a line break every 76 characters, as some released pkls hold them) broke
    every row into many lines, with exit 0: the TSV now holds them without the breaks, and decodes to the same images.
    A pkl of no video, a video of no frame, an id with a tab: one line, nothing written. An index whose offset is not
    a line start was read as a video of id "" by the tools (training refused it)."""
    src = dataset.load_pickle(f'{toy[0]}/img_toy.pkl')
    vids = sorted(src)[:3]
    pkl = {v: [base64.encodebytes(base64.b64decode(b)).decode() for b in src[v]] for v in vids}
    assert all('\n' in b[:-1] for b in pkl[vids[0]])
    with open(tmp_path / 'x.pkl', 'wb') as f:
        pickle.dump(pkl, f)
    r = run_tool(os.path.join(TOOLS, 'extract_tsv.py'), f'--path={tmp_path}/x')
    assert r.returncode == 0, r.stderr
    back = extract_tsv.read_tsv(str(tmp_path / 'x.tsv'), str(tmp_path / 'x.lineidx'))
    assert list(back) == vids and all(back[v] == [''.join(b.split()) for b in pkl[v]] for v in vids)
    assert all(base64.b64decode(b) == base64.b64decode(o) for v in vids for b, o in zip(back[v], src[v]))
    assert len((tmp_path / 'x.tsv').read_bytes().splitlines()) == 3
    for bad, said in [({}, 'holds no video'), ({'a': []}, 'no video holds a frame'),
                      ({'a\tb': ['QUFB']}, "video id 'a\\tb' holds a tab or a newline, which end a TSV field or row")]:
        with open(tmp_path / 'y.pkl', 'wb') as f:
            pickle.dump(bad, f)
        r = run_tool(os.path.join(TOOLS, 'extract_tsv.py'), f'--path={tmp_path}/y')
        assert r.returncode == 1 and r.stderr.strip().startswith(f'{tmp_path}/y.pkl: {said}'), r.stderr
        assert not os.path.exists(tmp_path / 'y.tsv')
    # frames as bytes or in a numpy array (dataset.py reads both), and a video of no frame beside others (training
    # skips it as a bad sample): the same rows, the frameless video left out and named (both stopped the tool)
    src_tsv = (tmp_path / 'x.tsv').read_bytes()
    for kind, wrap in (('bytes', lambda fs: [f.encode() for f in fs]), ('numpy', np.array)):
        with open(tmp_path / f'{kind}.pkl', 'wb') as f:
            pickle.dump({**{v: wrap(pkl[v]) for v in vids[:2]}, 'empty': wrap([]), vids[2]: wrap(pkl[vids[2]])}, f)
        r = run_tool(os.path.join(TOOLS, 'extract_tsv.py'), f'--path={tmp_path}/{kind}')
        assert r.returncode == 0 and (tmp_path / f'{kind}.tsv').read_bytes() == src_tsv, (kind, r.stderr)
        assert f'{tmp_path}/{kind}.pkl: video "empty" holds no frame: left out' in r.stderr
    offsets = (tmp_path / 'x.lineidx').read_text().split()
    (tmp_path / 'x.lineidx').write_text(f'{offsets[0]}\n{int(offsets[1]) + 5}\n{offsets[2]}\n')
    with pytest.raises(dataset.DataError, match=rf'x.lineidx: entry 1 is byte {int(offsets[1]) + 5}, but line 1 of '):
        extract_tsv.read_tsv(str(tmp_path / 'x.tsv'), str(tmp_path / 'x.lineidx'))
    extract_tsv.write_tsv(back, str(tmp_path / 'v.tsv'), str(tmp_path / 'v.id2lineidx.pkl'))  # VIOLETv2's layout
    index = dataset.load_pickle(str(tmp_path / 'v.id2lineidx.pkl'))
    index[vids[1]] += 3
    with open(tmp_path / 'v.id2lineidx.pkl', 'wb') as f:
        pickle.dump(index, f)
    with pytest.raises(dataset.BadSample, match=rf'v.tsv: offset {index[vids[1]]} is not the start of a line'):
        extract_tsv.read_tsv(str(tmp_path / 'v.tsv'), str(tmp_path / 'v.id2lineidx.pkl'))


# ---- dataset.str2img / str2txt

def pil_reference(b64, size):
    """The original's pipeline (PIL + torchvision transforms on the PIL image)."""
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert('RGB')
    w, h = img.size
    return TV.Compose([TV.Pad([0, (w - h) // 2] if w > h else [(h - w) // 2, 0]), TV.Resize([size, size]),
                       TV.ToTensor()])(img)


def smooth_image(rng, h, w):
    x = Image.fromarray(rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    x = np.array(x)
    x[h // 4:h // 2, w // 5:w // 2] = [250, 20, 20]  # a sharp edge too
    return Image.fromarray(x)


@pytest.mark.parametrize('h,w', [(64, 80), (80, 64), (64, 81), (81, 64), (33, 50), (100, 100), (240, 320), (201, 120)])
@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_str2img_matches_pil_pipeline(h, w, fmt):
    rng = np.random.default_rng(h * 1000 + w)
    buf = io.BytesIO()
    smooth_image(rng, h, w).save(buf, format=fmt)
    b64 = base64.b64encode(buf.getvalue()).decode()
    for size in (64, 224):
        ours, ref = dataset.b64_to_img(b64, size), pil_reference(b64, size)
        assert ours.shape == ref.shape == (3, size, size) and ours.dtype == torch.float32
        assert (ours - ref).abs().mean().item() < 1 / 255, (h, w, size)


def test_16_bit_grey_frames_read_as_their_8_bit_values(tmp_path):
    """A 16-bit grey PNG or TIFF (a microscope's or a depth camera's frames) went through PIL's convert('RGB'),
    which clips at 255: an almost white frame, without a word. It now reads as the same image saved with 8 bits;
    32-bit and float images, which have no one 8-bit reading, are refused, naming the file."""
    grey16 = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    grey8 = np.rint(grey16 / 257).astype(np.uint8)
    for fmt in ('PNG', 'TIFF'):
        buf = io.BytesIO()
        Image.fromarray(grey16).save(buf, format=fmt)
        assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith('I;16')
        img = dataset.decode_image(buf.getvalue())
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
        assert torch.equal(img, torch.from_numpy(grey8).expand(3, -1, -1)), fmt
        # the VQ tokens' input (PIL's arithmetic) reads it as training does too
        buf8 = io.BytesIO()
        Image.fromarray(grey8).save(buf8, format='PNG')
        b64, b64_8 = (base64.b64encode(b.getvalue()).decode() for b in (buf, buf8))
        assert torch.equal(extract_vq.vq_input(b64, 56), extract_vq.vq_input(b64_8, 56)), fmt
    for arr, said in ((grey16.astype(np.float32) / 65535, 'a floating-point image (PIL mode F)'),
                      (grey16.astype(np.int32) * 1000, 'a 32-bit integer image (PIL mode I)')):
        Image.fromarray(arr).save(tmp_path / 'x.tif')
        with pytest.raises(dataset.BadVideo, match=rf'^{tmp_path}/x.tif: not an image \({re.escape(said)}: save it with 8 or'):
            dataset.read_image(str(tmp_path / 'x.tif'))


@pytest.mark.parametrize('h,w', [(36, 48), (35, 48), (100, 101), (240, 320), (201, 500), (30, 300), (150, 224),
                                 (48, 36), (101, 100), (480, 360), (300, 31), (64, 64)])
@pytest.mark.parametrize('layout', ['channels_last', 'channels_first'])
def test_pad_resize_is_pad_then_resize(h, w, layout):
    """pad_resize is bit-identical to the original's order, pad to square then resize: landscape frames are
    resized horizontally before the rows of padding are added, the padding keeps the decoder's channels-last
    layout (faster resize), whatever the input's layout. Frames enlarged or shrunk by under 1.4x go through PIL's
    own resize."""
    img = torch.from_numpy(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
    if layout == 'channels_first':
        img = img.contiguous()
    d = abs(w - h) // 2
    padded = torch.nn.functional.pad(img, (0, 0, d, d) if w > h else (d, d, 0, 0))
    for size in (64, 224):
        if min(padded.shape[1:]) >= dataset.PIL_BELOW * size:
            ref = torch.nn.functional.interpolate(padded[None], [size, size], mode='bilinear', antialias=True)[0]
        else:
            ref = torch.from_numpy(np.asarray(Image.fromarray(padded.permute(1, 2, 0).numpy()).resize(
                (size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)
        assert torch.equal(dataset.pad_resize(img, size), ref.float() / 255), (h, w, size)


PAD_RESIZE_VS_PIL = """
import sys, numpy as np, torch, torchvision.transforms as TV
from PIL import Image
sys.path.insert(0, sys.argv[1])
import dataset
worst, out = {True: 0.0, False: 0.0}, []
shapes = [(36, 48), (35, 48), (48, 36), (30, 300), (201, 500), (480, 360), (17, 64), (64, 64), (223, 224), (220, 220)]
# and padded sides at which torch's kernel put single values 2/255 off (ratios under 1.4: 280 -> 224, 480 -> 384)
for (h, w), sizes in [(hw, (64, 224)) for hw in shapes] + [((280, 280), (224,)), ((210, 280), (224,)), ((360, 480), (384,))]:
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    d = abs(w - h) // 2
    for size in sizes:
        ours = dataset.pad_resize(torch.from_numpy(img).permute(2, 0, 1), size)
        pil = TV.Compose([TV.Pad([0, d] if w > h else [d, 0]), TV.Resize([size, size]), TV.ToTensor()])(
            Image.fromarray(img))
        by_pil = min(h, w) + 2 * d < 1.4 * size
        worst[by_pil] = max(worst[by_pil], (ours - pil).abs().max().item() * 255)
        out.append(ours)
torch.save(out, sys.argv[2])
print(torch.backends.cpu.get_cpu_capability(), worst[False], worst[True])
"""


def test_pad_resize_within_1_255_of_pil_on_any_cpu(tmp_path):
    """Every value of pad_resize within 1/255 of the original's PIL path (random noise, the hardest case), equal to
    it where the frame is enlarged or shrunk by under 1.4x (torch's kernel was 2/255 off at 64 -> 224, and at single
    values of 280 -> 224 and 480 -> 384), and bit for bit the same frames
    whatever torch takes the CPU for: as one without AVX2 (ATEN_CPU_CAPABILITY=default), torchvision's resize cast
    to float and was 2/255 from PIL's."""
    frames, env = [], {k: v for k, v in os.environ.items() if k != 'ATEN_CPU_CAPABILITY'}
    for cap in ('', 'default'):  # this CPU's, then none
        r = subprocess.run([sys.executable, '-c', PAD_RESIZE_VS_PIL, ROOT, str(tmp_path / f'out{cap}.pt')],
                           capture_output=True, text=True, env={**env, 'ATEN_CPU_CAPABILITY': cap} if cap else env,
                           check=True)
        name, worst, worst_by_pil = r.stdout.strip().splitlines()[-1].rsplit(' ', 2)  # (name: torch's, of the CPU)
        assert float(worst) <= 1.0001 and float(worst_by_pil) == 0, (name, worst, worst_by_pil)
        frames.append((name, torch.load(tmp_path / f'out{cap}.pt')))
    (this_cpu, ours), (none, theirs) = frames
    assert this_cpu != none and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_str2txt(tok_dir):
    ds = dataset.Dataset_Base(dict(txt_backbone=tok_dir, size_txt=10))
    txt, mask = ds.str2txt('A Red Square moves LEFT')
    assert txt.dtype == mask.dtype == np.int64 and txt.shape == mask.shape == (10,)
    assert txt[0] == 101 and list(txt).index(102) == 6 and (txt[7:] == 0).all()
    assert (mask == (txt != 0)).all() and mask.sum() == 7
    txt, mask = ds.str2txt('word ' * 50)  # truncated, still ends with [SEP]
    assert txt[-1] == 102 and mask.all()


def test_txt_backbone_path_that_is_missing(tmp_path, monkeypatch):
    """The toy preset's ./_data/bert-tiny from another directory: transformers called it an invalid repo id."""
    import model
    monkeypatch.chdir(tmp_path)
    said = rf'^txt_backbone: no directory ./_data/nothing \(relative to the current directory, {tmp_path}\)$'
    with pytest.raises(FileNotFoundError, match=said):
        dataset.get_tokenizer('./_data/nothing')
    # the bundled one: where it is, and how to name it
    said = (f'txt_backbone: no directory ./_data/bert-tiny (relative to the current directory, {tmp_path}; the '
            f'repository has {ROOT}/_data/bert-tiny: run from {ROOT}, or add --set txt_backbone={ROOT}/_data/bert-tiny)')
    with pytest.raises(FileNotFoundError, match=f'^{re.escape(said)}$'):
        dataset.get_tokenizer('./_data/bert-tiny')
    with pytest.raises(FileNotFoundError, match=f'^{re.escape(said)}$'):
        model.load_bert('./_data/bert-tiny')
    with pytest.raises(FileNotFoundError, match=f'^txt_backbone: no directory {tmp_path}/bert$'):
        model.load_bert(f'{tmp_path}/bert')


def test_home_in_path_keys(tmp_path, monkeypatch):
    """'~/data' in a path key is the home's: path_data was looked up as a folder named '~' (a missing file),
    path_output made one in the working directory, and txt_backbone reached transformers as a bad repo id."""
    import agent
    import model
    monkeypatch.setenv('HOME', str(tmp_path))
    shutil.copytree(f'{ROOT}/_data/bert-tiny', tmp_path / 'bert')
    args = agent.load_args(f'{ROOT}/_data/toy/args_toy-qamc.json', ['path_data=~/data', 'path_output=~/runs/a',
                                                                    'txt_backbone=~/bert', 'txt_vocab=~/bert/vocab.txt'])
    assert (args['path_data'], args['path_output']) == (f'{tmp_path}/data', f'{tmp_path}/runs/a')
    assert (args['txt_backbone'], args['txt_vocab']) == (f'{tmp_path}/bert', f'{tmp_path}/bert/vocab.txt')
    assert model.load_bert('~/bert').config.hidden_size == 128  # (also written by hand, not through a config)
    assert len(dataset.get_tokenizer('~/bert')) == 30522


def test_txt_backbone_id_not_in_the_cache(monkeypatch):
    """A model id that is neither a directory nor in the Hugging Face cache (a typo, or a machine that never fetched
    it): one message naming the key, not transformers' note on connecting to huggingface.co (offline here, so
    that no retry waits for the network)."""
    import huggingface_hub.constants
    import model
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    said = r"^txt_backbone: 'bert-tiny-typo' is not a local directory and not in the Hugging Face cache \(fetch it once "
    with pytest.raises(FileNotFoundError, match=said):
        dataset.get_tokenizer('bert-tiny-typo')
    with pytest.raises(FileNotFoundError, match=said):
        model.load_bert('bert-tiny-typo')


HUB_LOAD = """
import os, socket, sys
sys.path.insert(0, sys.argv[1])
tried = []
def refuse(*a, **k):
    tried.append(a[:1])
    raise OSError('no network in this test')
socket.getaddrinfo = refuse
socket.socket.connect = refuse
import dataset, model
try:
    tok = dataset.get_tokenizer('bert-base-uncased')
    bert = model.load_bert('bert-base-uncased')
    print('loaded', len(tok), bert.config.hidden_size)
except FileNotFoundError as e:
    print('error', e)
print('network', len(tried))
"""


def hub_cache(root, files):
    """A Hugging Face cache holding bert-base-uncased as `files` (name -> writer of that file)."""
    snap = root / 'models--bert-base-uncased' / 'snapshots' / ('0' * 40)
    snap.mkdir(parents=True)
    (root / 'models--bert-base-uncased' / 'refs').mkdir()
    (root / 'models--bert-base-uncased' / 'refs' / 'main').write_text('0' * 40)
    for name, write in files.items():
        write(snap / name)
    return root


def test_cached_model_id_loads_without_the_network(tok_dir, tmp_path):
    """bert-base-uncased in the Hugging Face cache, no network and HF_HUB_OFFLINE unset: transformers asked the hub
    first and retried for minutes (about 2.5 a run, 36 'Retrying' lines) before it read the cache. The cache is read
    first now, the network never tried. A cache that lacks vocab.txt is named as such (it gave a 5-token tokenizer,
    reported as 'does not fit the model')."""
    import transformers
    weights = lambda p: transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(tok_dir)).save_pretrained(
        p.parent / 'w') or shutil.move(p.parent / 'w' / 'model.safetensors', p)
    copy = lambda name: lambda p: shutil.copy(f'{tok_dir}/{name}', p)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'TRANSFORMERS_'))}
    whole = hub_cache(tmp_path / 'hub', {'config.json': copy('config.json'), 'vocab.txt': copy('vocab.txt'),
                                          'tokenizer_config.json': copy('tokenizer_config.json'),
                                          'model.safetensors': weights})
    r = subprocess.run([sys.executable, '-c', HUB_LOAD, ROOT], capture_output=True, text=True, timeout=300,
                       env=dict(env, HF_HUB_CACHE=str(whole)))
    # (huggingface_hub itself looks up its 'agent harnesses' list once a process, best effort, without retries)
    assert r.stdout.splitlines()[-2] == 'loaded 30522 128' and r.stdout.splitlines()[-1] in ('network 0', 'network 1'), (
        r.stdout + r.stderr[-2000:])
    assert 'Could not reach the Hub' not in r.stderr and 'Retrying' not in r.stderr, r.stderr[-2000:]
    partial = hub_cache(tmp_path / 'hub2', {'config.json': copy('config.json')})
    r = subprocess.run([sys.executable, '-c', HUB_LOAD, ROOT], capture_output=True, text=True, timeout=300,
                       env=dict(env, HF_HUB_CACHE=str(partial), HF_HUB_OFFLINE='1'))
    assert r.stdout.splitlines()[-2:] == [
        "error txt_backbone: the Hugging Face cache of 'bert-base-uncased' holds no tokenizer vocabulary (vocab.txt), "
        "and it could not be fetched: fetch it once where there is network, or name a vocab.txt with the config key "
        "txt_vocab", 'network 0'], r.stdout + r.stderr[-2000:]  # (offline: not even the agents list)


def test_tokenizer_must_fit_the_model(tok_dir, tmp_path):
    """A directory without vocabulary is an error (transformers would build a 5-token tokenizer mapping every
    word to [UNK]); txt_vocab gives the vocabulary separately; size and special ids are checked."""
    import transformers
    cfg_only = tmp_path / 'cfg'
    transformers.BertConfig.from_pretrained(tok_dir).save_pretrained(cfg_only)
    with pytest.raises(ValueError, match=f'^{cfg_only} has no tokenizer vocabulary .*txt_vocab'):
        dataset.Dataset_Base(dict(txt_backbone=str(cfg_only)))
    for vocab in (f'{tok_dir}/vocab.txt', tok_dir):  # a vocab.txt, or a tokenizer directory
        ds = dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=vocab, size_txt=8))
        assert ds.str2txt('a man is talking')[0].tolist() == [101, 1037, 2158, 2003, 3331, 102, 0, 0]
    with pytest.raises(FileNotFoundError, match=f'txt_vocab: no vocabulary at {tmp_path}/nope.txt'):
        dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=str(tmp_path / 'nope.txt')))
    words = open(f'{tok_dir}/vocab.txt').read().splitlines()
    (tmp_path / 'short.txt').write_text('\n'.join(words[:1000]) + '\n')
    with pytest.raises(dataset.DataError, match=fr'tokenizer {tmp_path}/short.txt does not fit the model \(txt_vocab / '
                                                fr'txt_backbone\): 1000 tokens, but the BERT config of {cfg_only} has '
                                                fr'vocab_size 30522$'):
        dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=str(tmp_path / 'short.txt')))
    words[103], words[104] = words[104], words[103]  # [MASK] one id off
    (tmp_path / 'moved.txt').write_text('\n'.join(words) + '\n')
    with pytest.raises(dataset.DataError, match=r'does not fit the model .*: \[MASK\] is id 104, expected 103$'):
        dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=str(tmp_path / 'moved.txt')))
    # size_txt past BERT's position table failed inside transformers at the first step, after the run's folder was made
    assert dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=tok_dir, size_txt=512)).size_txt == 512
    with pytest.raises(dataset.DataError, match=f"^config error: key 'size_txt' is 513, but the text embedder of "
                                                f"{cfg_only} has 512 positions \\(max_position_embeddings\\): at most 512$"):
        dataset.Dataset_Base(dict(txt_backbone=str(cfg_only), txt_vocab=tok_dir, size_txt=513))


# ---- datasets on the toy corpus

def loaders(ds, batch):
    for workers in (0, 2):
        yield torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=dataset.collate_skip)


def test_toy_corpus_files(toy):
    out, counts = toy
    for d in ['toyvid', 'toyimg']:
        for name in [f'img_{d}_train_0', f'img_{d}_train_1', f'img_{d}_val']:
            assert os.path.isfile(f'{out}/{name}.tsv') and os.path.isfile(f'{out}/{name}.lineidx')
        for name in [f'txt_{d}.json', f'vq_{d}.pkl']:
            assert os.path.isfile(f'{out}/{name}')
    for name in ['img_toy.pkl', 'txt_toy-retrieval.json', 'txt_toy-qamc.json', 'txt_toy-qaoe.json', 'README.txt']:
        assert os.path.isfile(f'{out}/{name}')
    assert not os.path.exists(f'{out}/_videos')
    with open(f'{out}/vq_toyvid.pkl', 'rb') as f:
        vq = pickle.load(f)
    v = next(iter(vq.values()))
    assert v.dtype == np.int16 and v.shape == (4, 2, 2) and 0 <= v.min() and v.max() < 8192
    with open(f'{out}/img_toy.pkl', 'rb') as f:
        frames = pickle.load(f)
    assert len(frames) == 16 and all(len(v) == 5 for v in frames.values())
    assert b64_to_array(frames['toy_train_00000'][0]).shape == (64, 80, 3)  # not square
    qaoe = json.load(open(f'{out}/txt_toy-qaoe.json'))
    assert len(qaoe['vocab']) == 12 and all(0 <= it['answer'] < 12 for s in ('train', 'val', 'test') for it in qaoe[s])
    caps = [it['caption'] for it in json.load(open(f'{out}/txt_toy-retrieval.json'))['test']]
    assert len(set(caps)) == len(caps)


def test_toy_is_deterministic(toy, tmp_path):
    make_toy.make_toy(str(tmp_path), seed=0, size_img=64, n_videos=6, n_val=4, n_images=5, n_down=8, n_down_eval=4,
                      workers=1)
    for name in sorted(os.listdir(toy[0])):
        if name != 'README.txt':
            assert (tmp_path / name).read_bytes() == open(os.path.join(toy[0], name), 'rb').read(), name


def test_pretrain_datasets(args):
    assert dataset.count_parts(args, 'toyvid') == 2 and dataset.count_parts(args, 'toyimg') == 2
    assert dataset.count_parts(args, 'nothing') == 0
    for d, T in [('toyvid', 4), ('toyimg', 1)]:
        for split, part in [('train', 0), ('train', 1), ('val', None)]:
            ds = dataset.Dataset_Pretrain(args, d, split, part)
            for loader in loaders(ds, 3):
                n = 0
                for (img, txt, mask, vq), skipped in loader:
                    B = img.shape[0]
                    assert img.shape == (B, T, 3, 64, 64) and txt.shape == mask.shape == (B, 16)
                    assert vq.shape == (B, T * 5) and vq.dtype == torch.int64 and skipped == 0
                    assert (vq[:, ::5] == -1).all() and (vq.reshape(B, T, 5)[:, :, 1:] >= 0).all()
                    n += B
                assert n == len(ds)
    ds = dataset.Dataset_Pretrain(args, 'toyvid', 'val')
    img, txt, mask, vq = ds[0]
    vid = ds.tsv.read(ds.lineidx[0])[0]
    cap = json.load(open(os.path.join(args['path_data'], 'txt_toyvid.json')))['val'][vid][0]
    assert (txt == ds.str2txt(cap)[0]).all()
    assert (vq[1:5] == ds.vq[vid][0].reshape(-1)).all() and (vq[6:10] == ds.vq[vid][1].reshape(-1)).all()


def test_downstream_datasets(args):
    a = dict(args, dataset='toy')
    for split, n in [('train', 8), ('val', 4), ('test', 4)]:
        mc = dataset.Dataset_QAMC(dict(a, task='toy-qamc'), split)
        oe = dataset.Dataset_QAOE(dict(a, task='toy-qaoe'), split)
        rt = dataset.Dataset_Retrieval(dict(a, task='toy-retrieval'), split)
        assert len(mc) == len(oe) == len(rt) == n and rt.txt[0].keys() == {'video', 'caption'}
        for loader in loaders(mc, 3):
            for (img, txt, mask, ans), skipped in loader:
                assert img.shape[1:] == (5, 3, 64, 64) and txt.shape[1:] == mask.shape[1:] == (5, 16)
                assert ans.dtype == torch.int64 and skipped == 0
        for loader in loaders(oe, 3):
            for (img, txt, mask, ans), skipped in loader:
                assert img.shape[1:] == (5, 3, 64, 64) and txt.shape[1:] == (16,) and (ans < 12).all()
        for loader in loaders(rt, 3):
            for (img, txt, mask), skipped in loader:
                assert img.shape[1:] == (5, 3, 64, 64) and txt.shape[1:] == (16,)
    item = mc.txt[0]
    _, txt, _, ans = mc[0]
    assert ans == item['answer'] and (txt[2] == mc.str2txt(item['question'] + ' ' + item['option_2'])[0]).all()
    # each item's frames are its own video's, decoded from img_toy.pkl here
    with open(os.path.join(a['path_data'], 'img_toy.pkl'), 'rb') as f:
        frames = pickle.load(f)
    for ds in (mc, oe, rt):
        vids = [it['video'] for it in ds.txt]
        assert len(set(vids)) > 1
        for i, vid in enumerate(vids):
            want = torch.stack([dataset.b64_to_img(b, 64) for b in frames[vid]])
            assert torch.equal(ds[i][0], want), (type(ds).__name__, i, vid)
            if vids[(i + 1) % len(vids)] != vid:  # the next item's video looks different
                assert not torch.equal(ds[(i + 1) % len(vids)][0], want)


def test_downstream_frames_from_tsv(args, tmp_path):
    """Without img_toy.pkl, img_toy.tsv + .lineidx gives the same samples."""
    src = args['path_data']
    for name in ['txt_toy-retrieval.json']:
        shutil.copy(os.path.join(src, name), tmp_path / name)
    with open(os.path.join(src, 'img_toy.pkl'), 'rb') as f:
        frames = pickle.load(f)
    extract_tsv.write_tsv(frames, str(tmp_path / 'img_toy.tsv'), str(tmp_path / 'img_toy.lineidx'))
    a = dict(args, dataset='toy', task='toy-retrieval')
    from_pkl = dataset.Dataset_Retrieval(a, 'val')
    from_tsv = dataset.Dataset_Retrieval(dict(a, path_data=str(tmp_path)), 'val')
    assert from_tsv.path_frames.endswith('.tsv') and set(from_tsv.frames) == set(frames)
    for i in range(len(from_pkl)):
        assert torch.equal(from_pkl[i][0], from_tsv[i][0])
    for loader in loaders(from_tsv, 2):
        assert sum(len(b[0][0]) for b in loader) == len(from_tsv)
    offsets = (tmp_path / 'img_toy.lineidx').read_text().split()
    (tmp_path / 'img_toy.lineidx').write_text('\n'.join(offsets[:1] + offsets[2:]) + '\n')  # one video's line dropped
    with pytest.raises(ValueError, match=rf'img_toy.lineidx: entry 1 is byte {offsets[2]}, but line 1 of '
                                         rf'{tmp_path}/img_toy.tsv starts at byte {offsets[1]}'):
        dataset.Dataset_Retrieval(dict(a, path_data=str(tmp_path)), 'val')


# ---- bad data

@pytest.fixture
def bad_copy(toy, tmp_path):
    """A writable copy of the toy corpus to damage."""
    shutil.copytree(toy[0], tmp_path / 'd')
    return str(tmp_path / 'd')


def edit_pickle(path, fn):
    with open(path, 'rb') as f:
        obj = pickle.load(f)
    fn(obj)
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def edit_json(path, fn):
    obj = json.load(open(path))
    fn(obj)
    json.dump(obj, open(path, 'w'))


def jpeg_garbage():
    return base64.b64encode(b'\xff\xd8\xff\xe0' + b'\x00garbage' * 20).decode()


def test_bad_frames_downstream(args, bad_copy):
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval')
    items = json.load(open(f'{bad_copy}/txt_toy-retrieval.json'))['val']
    v0, v1, v2, v3 = [it['video'] for it in items]

    def damage(frames):
        frames[v0] = frames[v0][:1] + ['#not base64!'] + frames[v0][2:]
        frames[v1] = frames[v1][:3] + [jpeg_garbage()] + frames[v1][4:]
        frames[v2] = frames[v2][:4]
        del frames[v3]
    edit_pickle(f'{bad_copy}/img_toy.pkl', damage)
    ds = dataset.Dataset_Retrieval(a, 'val')
    with pytest.raises(ValueError, match=f'img_toy.pkl: video "{v0}" frame 1: cannot decode'):
        ds[0]
    with pytest.raises(ValueError, match=f'img_toy.pkl: video "{v1}" frame 3: cannot decode'):
        ds[1]
    with pytest.raises(ValueError, match=f'img_toy.pkl: video "{v2}" has 4 frames, expected 5'):
        ds[2]
    with pytest.raises(ValueError, match=f'img_toy.pkl: no video "{v3}"'):
        ds[3]
    # a non-JPEG that is no image either goes through PIL and fails the same way
    with pytest.raises(ValueError, match='cannot decode'):
        ds.decode_frames([base64.b64encode(b'plain junk').decode()] * 5, 'x', 'here')
    # skip_bad: every sample is bad here, all counted, nothing raised
    ds = dataset.Dataset_Retrieval(dict(a, skip_bad=True), 'val')
    for loader in loaders(ds, 3):
        assert [n for _, n in loader] == [3, 1] and all(b is None for b, _ in loader)
    # size_frame fixes the expected count: 4 frames wanted -> now only v2 is fine
    ds = dataset.Dataset_Retrieval(dict(a, skip_bad=True, size_frame=4), 'val')
    assert [ds[i] is None for i in range(4)] == [True, True, False, True]


def test_bad_lines_pretrain(args, bad_copy, monkeypatch):
    name = f'{bad_copy}/img_toyvid_train_0'
    lines = open(name + '.tsv', 'rb').read().split(b'\n')[:-1]
    vids = [ln.split(b'\t')[0].decode() for ln in lines]
    lines[1] = b'\t'.join(lines[1].split(b'\t')[:3])  # 2 frames, not 4
    lines[2] = b'\t'.join(lines[2].split(b'\t')[:2] + [b'@@@'] + lines[2].split(b'\t')[3:])
    with open(name + '.tsv', 'wb') as f:
        f.write(b'\n'.join(lines) + b'\n')
    offsets = np.cumsum([0] + [len(ln) + 1 for ln in lines])[:-1].tolist()
    offsets[3] += 5  # not a line start
    offsets.append(offsets[-1] + 10 ** 6)  # past the end
    open(name + '.lineidx', 'w').write(''.join(f'{o}\n' for o in offsets))
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.pop(vids[4]))
    edit_json(f'{bad_copy}/txt_toyvid.json', lambda t: t['train'].pop(vids[5]))

    a = dict(args, path_data=bad_copy)
    with pytest.raises(ValueError, match=rf'img_toyvid_train_0.lineidx: entry 3 is byte {offsets[3]}, but line 3 of '
                                         rf'{name}.tsv starts at byte {offsets[3] - 5} \(a line dropped'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'train', 0)  # the index is refused up front
    open(name + '.lineidx', 'w').write(f'{offsets[0]}\n\n{offsets[1]}\n{offsets[2]}x\n')  # (was int()'s traceback)
    with pytest.raises(dataset.DataError, match=rf"^{name}.lineidx line 4: '{offsets[2]}x' is not a byte offset \(a damaged"):
        dataset.Dataset_Pretrain(a, 'toyvid', 'train', 0)
    open(name + '.lineidx', 'w').write(''.join(f'{o}\n' for o in offsets))
    # a TSV too large to be checked whole has only spread lines checked: the reads still name such offsets
    monkeypatch.setattr(dataset.TSV, 'check_index', lambda *_: None)
    ds = dataset.Dataset_Pretrain(a, 'toyvid', 'train', 0)
    ds[0]
    with pytest.raises(ValueError, match=f'img_toyvid_train_0.tsv line 1 .*: video "{vids[1]}" has 2 frames, expected 4'):
        ds[1]
    with pytest.raises(ValueError, match=f'line 2 .*: video "{vids[2]}" frame 1: cannot decode'):
        ds[2]
    with pytest.raises(ValueError, match=f'img_toyvid_train_0.tsv: offset {offsets[3]} is not the start of a line'):
        ds[3]
    with pytest.raises(ValueError, match=f'vq_toyvid.pkl: no VQ tokens for video "{vids[4]}"'):
        ds[4]
    with pytest.raises(ValueError, match=f'txt_toyvid.json\\["train"\\]: no caption for video "{vids[5]}"'):
        ds[5]
    with pytest.raises(ValueError, match='past the end'):
        ds[6]
    ds = dataset.Dataset_Pretrain(dict(a, skip_bad=True), 'toyvid', 'train', 0)
    for loader in loaders(ds, 4):
        batches = list(loader)
        assert sum(n for _, n in batches) == 6 and sum(len(b[0]) for b, _ in batches if b is not None) == 1


def test_bad_texts_and_answers(args, bad_copy):
    a = dict(args, path_data=bad_copy, dataset='toy')

    def damage_mc(t):
        t['val'][0]['answer'] = 5
        del t['val'][1]['option_4']
        t['val'][2]['answer'] = 'left'
        del t['test']
    edit_json(f'{bad_copy}/txt_toy-qamc.json', damage_mc)
    mc = dataset.Dataset_QAMC(dict(a, task='toy-qamc'), 'val')
    vid = mc.txt[0]['video']
    with pytest.raises(ValueError, match=rf'txt_toy-qamc.json\["val"\]\[0\] \(video "{vid}"\): answer 5 not in 0..4'):
        mc[0]
    with pytest.raises(KeyError, match=r'txt_toy-qamc.json\["val"\]\[1\]: no key "option_4"'):
        mc[1]
    with pytest.raises(ValueError, match=r"answer 'left' not in 0..4 \(size_option 5; -1: none of them\)$"):
        mc[2]
    mc.txt[2]['answer'] = mc.txt[2]['option_3']  # the answer's text where its index goes (a file written by hand)
    with pytest.raises(ValueError, match=rf"answer '{mc.txt[2]['option_3']}' not in 0..4 \(size_option 5; -1: none of them\) \(an answer is "
                                         rf"the index of its "
                                         rf'text: "{mc.txt[2]["option_3"]}" is 3\)$'):
        mc[2]
    mc[3]
    assert dataset.Dataset_QAMC(dict(a, task='toy-qamc', size_option=4), 'val')[1] is not None  # option_4 unused
    with pytest.raises(KeyError, match='txt_toy-qamc.json: no key "test"'):
        dataset.Dataset_QAMC(dict(a, task='toy-qamc'), 'test')

    def damage_oe(t):
        t['val'][0]['answer'] = 12
        del t['val'][1]['question']
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', damage_oe)
    oe = dataset.Dataset_QAOE(dict(a, task='toy-qaoe'), 'val')
    with pytest.raises(ValueError, match=r'answer 12 not in 0..11 \(the 12 answers of its "vocab"; -1: not in it\)$'):
        oe[0]
    oe.txt[0]['answer'] = oe.answers[7]
    with pytest.raises(ValueError, match=rf"answer '{oe.answers[7]}' not in 0..11 \(the 12 answers of its \"vocab\"; "
                                         rf"-1: not in it\) \(an answer is the index of its text: "
                                         rf'"{oe.answers[7]}" is 7\)$'):
        oe[0]
    oe.txt[0]['answer'] = 12
    with pytest.raises(KeyError, match='no key "question"'):
        oe[1]
    assert dataset.Dataset_QAOE(dict(a, task='toy-qaoe', size_vocab=20), 'val')[0][3] == 12
    oe = dataset.Dataset_QAOE(dict(a, task='toy-qaoe', skip_bad=True), 'val')
    assert dataset.collate_skip([oe[i] for i in range(4)])[1] == 2

    edit_json(f'{bad_copy}/txt_toy-retrieval.json', lambda t: t.update(val={it['video']: it['caption'] for it in t['val']}))
    with pytest.raises(ValueError, match=r'^.*txt_toy-retrieval.json: "val" is a dict, not a list of items \{"video": ..., '
                                         r'...\} \(a dict of video -> caption is the pretraining format\)$'):
        dataset.Dataset_Retrieval(dict(a, task='toy-retrieval'), 'val')  # it failed in item() with KeyError: 0

    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t.pop('vocab'))
    with pytest.raises(KeyError, match='txt_toy-qaoe.json: no key "vocab"'):
        dataset.Dataset_QAOE(dict(a, task='toy-qaoe'), 'val')


def test_missing_files(args, bad_copy):
    a = dict(args, path_data=bad_copy)
    with pytest.raises(FileNotFoundError, match='txt_nope-qamc.json'):
        dataset.Dataset_QAMC(dict(a, dataset='toy', task='nope-qamc'), 'val')
    with pytest.raises(FileNotFoundError, match='img_nope.pkl'):
        dataset.Dataset_QAMC(dict(a, dataset='nope', task='toy-qamc'), 'val')
    with pytest.raises(FileNotFoundError, match='img_toyvid_train_7.tsv'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'train', 7)
    os.remove(f'{bad_copy}/vq_toyimg.pkl')
    with pytest.raises(FileNotFoundError, match='vq_toyimg.pkl'):
        dataset.Dataset_Pretrain(a, 'toyimg', 'val')
    with pytest.raises(ValueError, match=r'vq_toyvid.pkl: VQ tokens of shape \(4, 2, 2\), expected \[T, 7, 7\]'):
        dataset.Dataset_Pretrain(dict(a, size_img=224), 'toyvid', 'val')


def test_invalid_json_names_its_file(tmp_path):
    """A hand-written annotation file with a stray comma used to stop with 'Expecting value: line 2 column 12',
    naming no file."""
    path = tmp_path / 'txt_mine-qamc.json'
    path.write_text('{"train": [,\n]}')
    with pytest.raises(ValueError, match=rf'^{path}: not valid JSON \(Expecting value: line 1 column 12'):
        dataset.load_json(str(path))


def test_annotations_are_utf8_whatever_the_locale(args, bad_copy):
    """Captions with accents and dashes, saved with a BOM (Windows editors do), give the tokens of plain UTF-8, also
    under a locale that is not UTF-8: a C locale without coercion stopped with a UnicodeDecodeError traceback, a
    Latin-1 one would have misread them. A file in Windows-1252 is one line naming it."""
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval')
    path = f'{bad_copy}/txt_toy-retrieval.json'
    txt = json.load(open(path))
    for split in txt.values():
        for it in split:
            it['caption'] = it['caption'].replace('moves', 'moves — a naïve café')
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(txt, f, ensure_ascii=False)
    want = [dataset.Dataset_Retrieval(a, 'val')[i][1].tolist() for i in range(2)]
    cafe = transformers.BertTokenizer.from_pretrained(args['txt_backbone']).convert_tokens_to_ids('cafe')
    assert cafe in want[0]  # (the accent was read: uncased WordPiece drops it)
    with open(path, 'w', encoding='utf-8-sig') as f:
        json.dump(txt, f, ensure_ascii=False)
    code = ('import json, sys, dataset; ds = dataset.Dataset_Retrieval(json.loads(sys.argv[1]), "val"); '
            'print(json.dumps([ds[i][1].tolist() for i in range(2)]))')
    env = {**os.environ, 'LC_ALL': 'C', 'PYTHONCOERCECLOCALE': '0', 'PYTHONUTF8': '0'}
    r = subprocess.run([sys.executable, '-c', code, json.dumps(a)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == want
    with open(path, 'w', encoding='cp1252') as f:
        json.dump(txt, f, ensure_ascii=False)
    with pytest.raises(dataset.DataError, match=rf'^{path}: not UTF-8 text \(byte 0x97 at offset \d+\): save it as UTF-8$'):
        dataset.Dataset_Retrieval(a, 'val')


def test_data_files_of_the_wrong_shape_are_named(args, bad_copy):
    """Values of the wrong kind in the data files: each was a traceback (even under skip_bad), or trained on in silence
    (float VQ tokens were truncated to integers: all-zero MVM targets)."""
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval')
    vid = dataset.Dataset_Retrieval(a, 'val').txt[0]['video']
    frames = dataset.load_pickle(f'{bad_copy}/img_toy.pkl')[vid]
    for value, said in [(None, 'holds a NoneType, not a list of frames'), ('QUFB', 'holds a str, not a list of frames'),
                        ([frames[0], None, *frames[2:]], 'frame 1 is a NoneType, not base64 text')]:
        edit_pickle(f'{bad_copy}/img_toy.pkl', lambda d: d.__setitem__(vid, value))
        ds = dataset.Dataset_Retrieval(a, 'val')
        with pytest.raises(dataset.BadSample, match=rf'img_toy.pkl: video "{vid}" {said}'):
            ds[0]
        assert dataset.Dataset_Retrieval(dict(a, skip_bad=True), 'val')[0] is None
    edit_pickle(f'{bad_copy}/img_toy.pkl', lambda d: None)
    with open(f'{bad_copy}/img_toy.pkl', 'wb') as f:
        pickle.dump(['QUFB'], f)
    with pytest.raises(dataset.DataError, match=r'img_toy.pkl: holds a list, not a dict video id -> \[frames\]$'):
        dataset.Dataset_Retrieval(a, 'val')
    json.dump([{'video': vid, 'caption': 'x'}], open(f'{bad_copy}/txt_toy-retrieval.json', 'w'))
    with pytest.raises(dataset.DataError, match=r'txt_toy-retrieval.json: holds a JSON list, not an object with a "val" key$'):
        dataset.Dataset_Retrieval(a, 'val')
    # pretraining: VQ tokens
    p = dict(args, path_data=bad_copy)
    vids = list(dataset.load_pickle(f'{bad_copy}/vq_toyvid.pkl'))
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.update({v: vq[v].astype(np.float32) / 8192 for v in vq}))
    with pytest.raises(dataset.DataError, match=r'vq_toyvid.pkl: video "[^"]+": VQ tokens of type float32, not whole numbers'):
        dataset.Dataset_Pretrain(p, 'toyvid', 'val')
    # floats of whole values are token ids: read as their integers
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.update({v: vq[v] * 8192 for v in vq}))
    ds = dataset.Dataset_Pretrain(p, 'toyvid', 'val')
    first = ds.tsv.read(ds.lineidx[0])[0]
    from_floats = ds[0][3]
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.update({v: vq[v].astype(np.int16) for v in vq}))
    ds = dataset.Dataset_Pretrain(p, 'toyvid', 'val')
    assert np.array_equal(ds[0][3], from_floats) and from_floats.dtype == np.int64
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.__setitem__(first, vq[first] + 0.7))
    with pytest.raises(dataset.BadSample, match=rf'vq_toyvid.pkl: video "{first}": VQ tokens of type float\d+, not whole numbers'):
        dataset.Dataset_Pretrain(p, 'toyvid', 'val')[0]
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.__setitem__(first, [[[1, 2], [3, 4]], [[1]]]))
    with pytest.raises(dataset.BadSample, match=rf'vq_toyvid.pkl: video "{first}": VQ tokens that are not one array'):
        dataset.Dataset_Pretrain(p, 'toyvid', 'val')[0]
    with open(f'{bad_copy}/vq_toyvid.pkl', 'wb') as f:
        pickle.dump(vids, f)
    with pytest.raises(dataset.DataError, match=r'vq_toyvid.pkl: holds a list, not a dict video id -> VQ tokens$'):
        dataset.Dataset_Pretrain(p, 'toyvid', 'val')


def test_items_checked_before_the_first_step(args, bad_copy):
    """A test video of another frame count and a question stored as a list were found when read: after an epoch of
    training, in the first evaluation. check_items (run before the first step) names them."""
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-qaoe')
    ds = dataset.Dataset_QAOE(a, 'test')
    vid = ds.txt[1]['video']
    edit_pickle(f'{bad_copy}/img_toy.pkl', lambda d: d.__setitem__(vid, d[vid][:3]))
    with pytest.raises(dataset.BadSample, match=rf'txt_toy-qaoe.json\["test"\]\[1\]: video "{vid}" has 3 frames in '
                                                rf'.*img_toy.pkl, expected 5'):
        dataset.Dataset_QAOE(a, 'test').check_items()
    edit_pickle(f'{bad_copy}/img_toy.pkl', lambda d: d.__setitem__(vid, ds.frames[vid]))
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t['vocab'].__setitem__(3, ['red', 'RED']))
    with pytest.raises(dataset.DataError, match=r'txt_toy-qaoe.json: "vocab"\[3\] is \[.red., .RED.\], not an answer text$'):
        dataset.Dataset_QAOE(a, 'test')
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t['vocab'].__setitem__(3, 'red'))
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t['test'][2].update(question=['what', 'colour']))
    with pytest.raises(dataset.BadSample, match=r'txt_toy-qaoe.json\["test"\]\[2\]: "question" is list \[.what., .colour.\], not a string$'):
        dataset.Dataset_QAOE(a, 'test').check_items()


def test_vq_list_layout(args, bad_copy):
    """Some releases store a list of T arrays [h, w]: read the same."""
    ref = dataset.Dataset_Pretrain(dict(args), 'toyvid', 'val')
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.update({k: list(v) for k, v in vq.items()}))
    ds = dataset.Dataset_Pretrain(dict(args, path_data=bad_copy), 'toyvid', 'val')
    assert all((ds[i][3] == ref[i][3]).all() for i in range(len(ds)))


# ---- extract_vq


def test_extract_vq_without_encoder_names_the_alternative(tmp_path):
    """encoder.pkl cannot be fetched everywhere: the message says where it comes from and what to do without it."""
    with pytest.raises(FileNotFoundError, match=rf'^DALL-E encoder not found at {tmp_path}/encoder.pkl: .*'
                                                r'https://cdn.openai.com/dall-e/encoder.pkl.*"mvm_target": "pixel"'):
        extract_vq.load_encoder(str(tmp_path / 'encoder.pkl'))

@pytest.mark.parametrize('h,w', [(240, 320), (321, 241), (100, 100), (35, 48)])
def test_extract_vq_input_is_the_originals_to_the_bit(h, w):
    """A VQ token is a label: the encoder's input is the original's (PIL pad, resize, to tensor) exactly, not the
    training input's 1/255 (which differs at about 0.1 % of values and could flip an argmax)."""
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(h + w), h, w).save(buf, format='JPEG')
    b64 = base64.b64encode(buf.getvalue()).decode()
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 8192, x.shape[2] // 8, x.shape[3] // 8)
    assert extract_vq.encode_frames(Record(), [b64, b64], frame=224).shape == (2, 7, 7)
    ref = pil_reference(b64, 56)
    assert torch.equal(seen[0][1], 0.8 * ref + 0.1)  # dall_e.map_pixels
    assert torch.equal(extract_vq.vq_input(b64, 16), pil_reference(b64, 16))


def test_base64_with_line_breaks_reads_as_the_original_read_it():
    """Frames written with base64.encodebytes (a line break every 76 characters, as MIME tools write them) decode as
    the original's b64decode decoded them, in training and in VQ extraction; a character outside the alphabet is
    still refused, not dropped."""
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(0), 48, 64).save(buf, format='JPEG')
    plain = base64.b64encode(buf.getvalue()).decode()
    broken = base64.encodebytes(buf.getvalue()).decode()
    assert '\n' in broken.strip()
    for b64 in (broken, broken.encode(), broken.replace('\n', '\r\n ')):
        assert torch.equal(dataset.b64_to_img(b64, 32), dataset.b64_to_img(plain, 32))
        assert torch.equal(extract_vq.vq_input(b64, 16), pil_reference(plain, 16))
    with pytest.raises(binascii.Error):
        dataset.b64_bytes(broken[:40] + '#' + broken[40:])


def test_extract_vq_with_random_small_encoder(toy, tmp_path, monkeypatch, capsys):
    from dall_e import Encoder
    torch.manual_seed(0)
    path = str(tmp_path / 'encoder.pkl')
    torch.save(Encoder(n_hid=64, n_blk_per_group=1, vocab_size=8192), path)  # pickled module, like encoder.pkl
    enc = extract_vq.load_encoder(path)
    frames = extract_tsv.read_tsv(f'{toy[0]}/img_toyvid_val.tsv', f'{toy[0]}/img_toyvid_val.lineidx')
    vq = extract_vq.encode_videos(enc, frames, frame=64, batch=5, progress=False)
    again = extract_vq.encode_videos(enc, frames, frame=64, batch=64, progress=False)
    assert list(vq) == list(frames)
    for v in vq:
        assert vq[v].dtype == np.int16 and vq[v].shape == (4, 2, 2)
        assert 0 <= vq[v].min() and vq[v].max() < 8192 and (vq[v] == again[v]).all()

    # the CLI (in-process: a subprocess would spend seconds importing torch) on X.tsv + X.lineidx -> X_vq.pkl
    for ext in ['tsv', 'lineidx']:
        shutil.copy(f'{toy[0]}/img_toyvid_val.{ext}', tmp_path / f'x.{ext}')
    argv = ['extract_vq.py', f'--path={tmp_path}/x', '--frame=64', f'--encoder={path}', '--device=cpu']
    monkeypatch.setattr(sys, 'argv', argv)
    extract_vq.main()
    with open(tmp_path / 'x_vq.pkl', 'rb') as f:
        cli = pickle.load(f)
    assert all((cli[v] == vq[v]).all() for v in vq)
    # several parts -> one vq_<dataset>.pkl (one --path per run wrote one part's videos, each run over the last)
    shutil.copy(f'{toy[0]}/img_toyvid_train_0.tsv', tmp_path / 'y.tsv')
    shutil.copy(f'{toy[0]}/img_toyvid_train_0.lineidx', tmp_path / 'y.lineidx')
    monkeypatch.setattr(sys, 'argv', argv[:1] + ['--path', f'{tmp_path}/x', f'{tmp_path}/y'] + argv[2:])
    with pytest.raises(SystemExit, match=r'several --path: give --out'):
        extract_vq.main()
    monkeypatch.setattr(sys, 'argv', sys.argv + ['--out', f'{tmp_path}/vq_both.pkl'])
    extract_vq.main()
    both = dataset.load_pickle(f'{tmp_path}/vq_both.pkl')
    assert set(both) == set(vq) | set(extract_tsv.read_tsv(f'{tmp_path}/y.tsv', f'{tmp_path}/y.lineidx')) > set(vq)
    assert all((both[v] == vq[v]).all() for v in vq)

    with pytest.raises(FileNotFoundError, match='cdn.openai.com/dall-e/encoder.pkl'):
        extract_vq.load_encoder(str(tmp_path / 'missing.pkl'))
    monkeypatch.setattr(sys, 'argv', argv[:3] + [f'--encoder={tmp_path}/missing.pkl'])
    with pytest.raises(SystemExit, match='cdn.openai.com/dall-e/encoder.pkl'):
        extract_vq.main()
    # an encoder file that is not one, a pkl of another kind, a frame that is not an image: one line each (tracebacks)
    (tmp_path / 'page.pkl').write_text('<html>404</html>')
    monkeypatch.setattr(sys, 'argv', argv[:3] + [f'--encoder={tmp_path}/page.pkl'])
    with pytest.raises(SystemExit, match=rf'^--encoder {tmp_path}/page.pkl: not the DALL-E encoder.pkl \('):
        extract_vq.main()
    with open(tmp_path / 'z.pkl', 'wb') as f:
        pickle.dump([1, 2], f)
    monkeypatch.setattr(sys, 'argv', argv[:1] + [f'--path={tmp_path}/z'] + argv[2:])
    with pytest.raises(SystemExit, match=rf'^{tmp_path}/z.pkl: holds a list, not frames'):
        extract_vq.main()
    # frames as bytes (dataset.py reads them), a video of no frame beside others: its tokens, it left out, named
    with open(tmp_path / 'w.pkl', 'wb') as f:
        pickle.dump({**{v: [b.encode() for b in fs] for v, fs in frames.items()}, 'empty': []}, f)
    monkeypatch.setattr(sys, 'argv', argv[:1] + [f'--path={tmp_path}/w'] + argv[2:])
    extract_vq.main()
    bytes_vq = dataset.load_pickle(f'{tmp_path}/w_vq.pkl')
    assert list(bytes_vq) == list(vq) and all((bytes_vq[v] == vq[v]).all() for v in vq)
    assert f'{tmp_path}/w.pkl: video "empty" holds no frame: left out' in capsys.readouterr().err
    bad = dict(frames)
    first = next(iter(bad))
    bad[first] = bad[first][:2] + ['bm90IGFuIGltYWdl'] + bad[first][3:]  # base64 of 'not an image'
    with pytest.raises(dataset.DataError, match=rf'^video "{first}" frame 2: cannot decode image'):
        extract_vq.encode_videos(enc, bad, frame=64, progress=False)
    dataset.write_pickle(bad, f'{tmp_path}/bad.pkl')  # the command line names the file too
    monkeypatch.setattr(sys, 'argv', argv[:1] + [f'--path={tmp_path}/bad'] + argv[2:])
    with pytest.raises(SystemExit, match=rf'^{tmp_path}/bad.pkl: video "{first}" frame 2: cannot decode image'):
        extract_vq.main()


def test_standin_vq_tokens(toy):
    frames = extract_tsv.read_tsv(f'{toy[0]}/img_toyimg_val.tsv', f'{toy[0]}/img_toyimg_val.lineidx')
    for v, f in frames.items():
        tok = make_toy.standin_vq(f, 64)
        assert tok.dtype == np.int16 and tok.shape == (1, 2, 2) and 0 <= tok.min() and tok.max() < 8192
    black = base64.b64encode(cv2.imencode('.jpg', np.zeros((64, 64, 3), np.uint8))[1].tobytes()).decode()
    white = base64.b64encode(cv2.imencode('.jpg', np.full((64, 64, 3), 255, np.uint8))[1].tobytes()).decode()
    assert (make_toy.standin_vq([black], 64) == 0).all() and (make_toy.standin_vq([white], 64) == 8191).all()


# ---- issue 14: frame counts, non-string texts, pickles that would run code

def test_frame_count_from_most_videos(args, bad_copy, capsys):
    """A short first video used to set the expected count, so every healthy video became 'bad' (and the
    error blamed a healthy one); now the count is the one most sampled videos have, and the odd one is named."""
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval')
    first = next(iter(dataset.load_pickle(f'{bad_copy}/img_toy.pkl')))
    edit_pickle(f'{bad_copy}/img_toy.pkl', lambda frames: frames.update({first: frames[first][:3]}))
    ds = dataset.Dataset_Retrieval(a, 'test')
    assert ds.size_frame == 5
    assert f'img_toy.pkl: 1 of 16 sampled videos do not have the common 5 frames: "{first}" (3)' in capsys.readouterr().out
    idx = [it['video'] for it in ds.txt].index(first)
    assert all(ds[i][0].shape[0] == 5 for i in range(len(ds)) if i != idx)
    with pytest.raises(ValueError, match=f'video "{first}" has 3 frames, expected 5'):
        ds[idx]
    assert dataset.Dataset_Retrieval(dict(a, size_frame=3), 'test').size_frame == 3  # size_frame wins
    # the same for frames in a TSV (line of the first video cut after its third frame)
    frames = dataset.load_pickle(f'{bad_copy}/img_toy.pkl')
    os.remove(f'{bad_copy}/img_toy.pkl')
    extract_tsv.write_tsv(frames, f'{bad_copy}/img_toy.tsv', f'{bad_copy}/img_toy.lineidx')
    assert dataset.Dataset_Retrieval(a, 'test').size_frame == 5


def test_texts_must_be_strings(args, bad_copy):
    """null or a list as caption / question / option crashed inside transformers; now a named bad sample."""
    a = dict(args, path_data=bad_copy, dataset='toy')
    edit_json(f'{bad_copy}/txt_toy-retrieval.json', lambda t: t['val'][1].update(caption=None))
    edit_json(f'{bad_copy}/txt_toy-qamc.json', lambda t: (t['val'][0].update(question=['what', 'is']),
                                                         t['val'][2].update(option_3=7)))
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t['val'].__setitem__(3, None))
    rt = dataset.Dataset_Retrieval(dict(a, task='toy-retrieval'), 'val')
    with pytest.raises(ValueError, match=r'txt_toy-retrieval.json\["val"\]\[1\]: "caption" is NoneType None, not a string'):
        rt[1]
    mc = dataset.Dataset_QAMC(dict(a, task='toy-qamc'), 'val')
    with pytest.raises(ValueError, match=r'txt_toy-qamc.json\["val"\]\[0\]: "question" is list \[\'what\', \'is\'\], not a string'):
        mc[0]
    with pytest.raises(ValueError, match=r'txt_toy-qamc.json\["val"\]\[2\]: "option_3" is int 7, not a string'):
        mc[2]
    with pytest.raises(ValueError, match=r'txt_toy-qaoe.json\["val"\]\[3\]: NoneType None, not an object'):
        dataset.Dataset_QAOE(dict(a, task='toy-qaoe'), 'val')[3]
    mc = dataset.Dataset_QAMC(dict(a, task='toy-qamc', skip_bad=True), 'val')
    assert dataset.collate_skip([mc[i] for i in range(4)])[1] == 2  # skippable
    vids = [ln.split('\t')[0] for ln in open(f'{bad_copy}/img_toyvid_val.tsv')]
    edit_json(f'{bad_copy}/txt_toyvid.json', lambda t: t['val'].update({vids[0]: [None], vids[1]: 3}))
    pre = dataset.Dataset_Pretrain(args | dict(path_data=bad_copy), 'toyvid', 'val')
    with pytest.raises(ValueError, match=rf'txt_toyvid.json\["val"\]\["{vids[0]}"\]: \[None\] is not a caption or a '
                                         rf'non-empty list of captions \(.*img_toyvid_val.tsv line 0'):
        pre[0]
    with pytest.raises(ValueError, match=rf'\["{vids[1]}"\]: 3 is not a caption'):
        pre[1]


def test_empty_texts_are_named(args, bad_copy, capsys):
    """An empty (or blank) caption, question or option trained as [CLS] [SEP] without a word: now a bad sample naming
    the file, item and video; a QA-MC question may be empty (caption-choice sets have none), counted once per split."""
    a = dict(args, path_data=bad_copy, dataset='toy')
    rt_vid = json.load(open(f'{bad_copy}/txt_toy-retrieval.json'))['val'][1]['video']
    edit_json(f'{bad_copy}/txt_toy-retrieval.json', lambda t: (t['val'][1].update(caption=''),
                                                               t['val'][2].update(caption=' \u200b\n\ufeff ')))
    edit_json(f'{bad_copy}/txt_toy-qamc.json', lambda t: (t['val'][0].update(question=''), t['val'][1].update(question=' '),
                                                         t['val'][2].update(option_3='')))
    edit_json(f'{bad_copy}/txt_toy-qaoe.json', lambda t: t['val'][3].update(question='  '))
    rt = dataset.Dataset_Retrieval(dict(a, task='toy-retrieval'), 'val')
    empty = r'is empty \(only \[CLS\] \[SEP\] would be left of it: no words to learn from or match\)'
    with pytest.raises(dataset.BadSample, match=rf'txt_toy-retrieval.json\["val"\]\[1\] \(video "{rt_vid}"\): "caption" {empty}$'):
        rt[1]
    with pytest.raises(dataset.BadSample, match=rf'\[2\] .*"caption" {empty}$'):
        rt[2]
    with pytest.raises(dataset.BadSample, match=rf'txt_toy-retrieval.json\["val"\]\[1\] .*"caption" {empty} \(1 more of the '
                                                r"split's items have an empty text\)"):
        rt.check_items()
    rt[0]
    # empty is what tokenises to nothing (white space, zero-width, control characters, lone accents passed str.strip)
    texts = ['', ' \u200b', '\x00\ufffd', '\u0301', '\t\xad', '\u2028', '?', 'é', '٣', '猫', '[PAD]', 'a\u200b']
    assert [rt.has_words(t) for t in texts] == [bool(rt.tokzr.tokenize(t)) for t in texts] == [False] * 6 + [True] * 6
    mc = dataset.Dataset_QAMC(dict(a, task='toy-qamc'), 'val')
    qs = json.load(open(f'{bad_copy}/txt_toy-qamc.json'))['val']
    assert capsys.readouterr().out == (f'{bad_copy}/txt_toy-qamc.json["val"]: 2 of {len(qs)} items have an empty "question" '
                                       f'(first [0], video "{qs[0]["video"]}"): their options are scored alone\n')
    tok = mc.tokzr
    assert [tok.decode(t[m > 0]) for t, m in zip(*mc[0][1:3])] == [f'[CLS] {qs[0][f"option_{i}"]} [SEP]' for i in range(5)]
    with pytest.raises(dataset.BadSample, match=rf'txt_toy-qamc.json\["val"\]\[2\] .*"option_3" {empty}$'):
        mc[2]
    with pytest.raises(dataset.BadSample, match=rf'txt_toy-qaoe.json\["val"\]\[3\] .*"question" {empty}$'):
        dataset.Dataset_QAOE(dict(a, task='toy-qaoe'), 'val')[3]
    assert dataset.Dataset_Retrieval(dict(a, task='toy-retrieval', skip_bad=True), 'val')[1] is None  # skippable
    # pretraining: the first caption is the one trained on
    vids = [ln.split('\t')[0] for ln in open(f'{bad_copy}/img_toyvid_val.tsv')]
    edit_json(f'{bad_copy}/txt_toyvid.json', lambda t: t['val'].update({vids[0]: ['', 'a red dot'], vids[1]: '\xad\u0301'}))
    pre = dataset.Dataset_Pretrain(args | dict(path_data=bad_copy), 'toyvid', 'val')
    with pytest.raises(dataset.BadSample, match=rf'txt_toyvid.json\["val"\]\["{vids[0]}"\]: the caption {empty} '
                                                rf'\(.*img_toyvid_val.tsv line 0'):
        pre[0]
    with pytest.raises(dataset.BadSample, match=rf'\["{vids[1]}"\]: the caption is empty'):
        pre[1]
    pre[2]
    edit_json(f'{bad_copy}/txt_toyvid.json', lambda t: t.update(val=[dict(video=v, caption='x') for v in vids]))
    with pytest.raises(ValueError, match=r'txt_toyvid.json: "val" is a list, not a dict video id -> caption\(s\) \(a list '
                                         r'of items is the downstream format\)$'):  # every video was 'without a caption'
        dataset.Dataset_Pretrain(args | dict(path_data=bad_copy), 'toyvid', 'val')


def test_missing_video_names_its_extraction_failure(args, bad_copy):
    """A video the extraction tool could not read is missing from the frames file: the message gives its reason
    from the <frames>.failed.json beside it (it said only 'no video')."""
    a = dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval')
    edit_json(f'{bad_copy}/txt_toy-retrieval.json', lambda t: t['val'][1].update(video='my_clip'))
    ds = dataset.Dataset_Retrieval(a, 'val')
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/img_toy.pkl: no video "my_clip"$'):
        ds[1]
    why = '/videos/my_clip.mp4: 2 frames, fewer than the 5 asked for'
    json.dump({'videos': '/videos', 'sample': 5, 'failed': {'/videos/my_clip.mp4': why}},
              open(f'{bad_copy}/img_toy.failed.json', 'w'))
    ds = dataset.Dataset_Retrieval(a, 'val')
    because = f' \\(its extraction failed, {bad_copy}/img_toy.failed.json: {why}\\)'
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/img_toy.pkl: no video "my_clip"{because}$'):
        ds[1]
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/txt_toy-retrieval.json\["val"\]\[1\]: no video "my_clip" in '
                                                rf'{bad_copy}/img_toy.pkl{because}$'):
        ds.check_items()
    vid = ds.txt[0]['video']
    ds.txt[0]['video'] += '.mp4'  # the file's name, not its id
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/img_toy.pkl: no video "{vid}.mp4" \(the ids are file names '
                                                rf'without their extension: "{vid}"\)$'):
        ds[0]
    ds.txt[0]['video'] = vid + ' '
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/img_toy.pkl: no video "{vid} " \(there is "{vid}": the id has '
                                                r'white space around it\)$'):
        ds[0]
    # a name typed (NFC: one code point for é) for a file named on macOS (NFD: e + a combining accent): both print
    # "café", so the message says what differs
    ds.frames[unicodedata.normalize('NFD', 'café')] = ds.frames[vid]
    ds.txt[0]['video'] = 'café'
    with pytest.raises(dataset.BadSample, match=rf'^{bad_copy}/img_toy.pkl: no video "café" \(there is one of the same '
                                                r'letters in another Unicode form, NFD: macOS writes file names '):
        ds[0]


def test_more_frames_than_the_model_embeds(args, bad_copy):
    """Videos of 8 frames (extracted with --sample 8) trained until the first step's 'img has 8 frames; VIOLET takes
    at most 6', after the output folder was made: now the frames file is named when the set opens."""
    edit_pickle(f'{bad_copy}/img_toy.pkl', lambda pkl: pkl.update({v: (f * 2)[:8] for v, f in pkl.items()}))
    with pytest.raises(dataset.DataError, match=rf'^{bad_copy}/img_toy.pkl: its videos have 8 frames; VIOLET takes at '
                                                r'most 6 \(emb_len\): extract at most 6 per video \(--sample\)$'):
        dataset.Dataset_Retrieval(dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval'), 'val')
    # size_frame 6 would make every video a bad sample (it did, at the first step): refused when the set opens
    with pytest.raises(dataset.DataError, match=rf"^config error: key 'size_frame' is 6, but none of 16 sampled videos of "
                                                rf"{bad_copy}/img_toy.pkl has that many frames \(they have 8; "):
        dataset.Dataset_Retrieval(dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval', frame_layout='pkl',
                                       size_frame=6), 'val')


class RunsCommand:
    """Unpickling this calls os.system(cmd): what a malicious data file could do."""
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_pickles_that_would_run_code_are_refused(args, bad_copy, tmp_path):
    marker = tmp_path / 'ran'
    evil = RunsCommand(f'touch {marker}')
    frames = dataset.load_pickle(f'{bad_copy}/img_toy.pkl')  # the real files read fine (numpy arrays in vq too)
    vq = dataset.load_pickle(f'{bad_copy}/vq_toyvid.pkl')
    assert all(isinstance(v, np.ndarray) and v.dtype == np.int16 for v in vq.values())
    with open(f'{bad_copy}/img_toy.pkl', 'wb') as f:
        pickle.dump({**frames, 'x': evil}, f)
    with open(f'{bad_copy}/vq_toyvid.pkl', 'wb') as f:
        pickle.dump([evil], f, protocol=2)
    refused = 'refused to unpickle posix.system: a data file may hold only dicts, lists, tuples, sets, str, bytes, numbers and numpy arrays'
    with pytest.raises(pickle.UnpicklingError, match=f'^{bad_copy}/img_toy.pkl: {refused}'):
        dataset.Dataset_Retrieval(dict(args, path_data=bad_copy, dataset='toy', task='toy-retrieval'), 'val')
    with pytest.raises(pickle.UnpicklingError, match=f'^{bad_copy}/vq_toyvid.pkl: {refused}'):
        dataset.Dataset_Pretrain(dict(args, path_data=bad_copy), 'toyvid', 'val')
    r = run_tool('_tools/extract_tsv.py', '--path', f'{bad_copy}/img_toy')
    assert r.returncode == 1 and r.stderr.strip().endswith(f'{bad_copy}/img_toy.pkl: {refused} (reading anything else could run code)')
    assert not marker.exists() and not os.path.exists(f'{bad_copy}/img_toy.tsv')
    # the same payload through the plain pickle module does run: the test can fail
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()
    (tmp_path / 'cut.pkl').write_bytes(pickle.dumps(frames)[:100])
    with pytest.raises(ValueError, match=f'^{tmp_path}/cut.pkl: not a readable pickle'):
        dataset.load_pickle(str(tmp_path / 'cut.pkl'))


def test_pretrain_frame_count_from_most_vq_entries(args, bad_copy, capsys):
    """The same for pretraining: a short first VQ entry no longer sets T for the whole dataset."""
    first = next(iter(dataset.load_pickle(f'{bad_copy}/vq_toyvid.pkl')))
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq.update({first: vq[first][:2]}))
    ds = dataset.Dataset_Pretrain(dict(args, path_data=bad_copy), 'toyvid', 'val')
    assert ds.size_frame == 4 and f'vq_toyvid.pkl: 1 of ' in capsys.readouterr().out
    assert all(ds[i][0].shape[0] == 4 for i in range(len(ds)) if ds.tsv.read(ds.lineidx[i])[0] != first)


def test_large_jpeg_default_exact_fast_decode_close(args, monkeypatch):
    """A JPEG 4x the target or larger: by default every pixel is decoded, so each value stays within 1/255 of the
    original's PIL pipeline (the reduced-scale decode moved 14 % of them by more, up to 7/255: it was the default
    for such frames once). With fast_decode, libjpeg decodes it at 1/2..1/8 scale: within 1/255 on average."""
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    smooth_image(rng, 1080, 1920).save(buf, format='JPEG', quality=90)
    assert dataset.jpeg_side(buf.getvalue()) == 1920
    b64 = base64.b64encode(buf.getvalue()).decode()
    ref = pil_reference(b64, 224)
    for fast in (False, True):
        ds = dataset.Dataset_Retrieval(dict(args, dataset='toy', task='toy-retrieval', size_img=224, fast_decode=fast), 'train')
        ours = ds.str2img(b64)
        assert ours.shape == ref.shape == (3, 224, 224)
        if fast:
            assert (ours - ref).abs().mean().item() < 1 / 255
            assert not torch.allclose(ours, ref, atol=1.01 / 255)  # it is the reduced path
            assert torch.equal(ours, dataset.b64_to_img(b64, 224, reduce=True))
        else:
            assert torch.allclose(ours, ref, atol=1.01 / 255, rtol=0)
            assert torch.equal(ours, dataset.b64_to_img(b64, 224))


def test_vq_extraction_decodes_every_pixel():
    """VQ targets are computed from full decodes, as the original's were: at VQ extraction's 56 px (frame 224) every
    frame of 224 px or more would take fast_decode's reduced-scale decode, whose values differ; extract_vq feeds the
    encoder the original's full decode, padded, resized and mapped."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    smooth_image(rng, 480, 640).save(buf, format='JPEG', quality=90)
    b64 = base64.b64encode(buf.getvalue()).decode()
    original = pil_reference(b64, 56)
    assert not torch.equal(dataset.b64_to_img(b64, 56, reduce=True), original)  # fast_decode would reduce such a frame
    seen = []

    def encoder(x):
        seen.append(x)
        return torch.zeros(len(x), 8192, 7, 7)
    tokens = extract_vq.encode_frames(encoder, [b64, b64], frame=224)
    assert tokens.shape == (2, 7, 7) and torch.equal(seen[0], (0.8 * original + 0.1).expand(2, -1, -1, -1))


def test_pretrain_part_gap_empty_part_and_vq_range(args, bad_copy, monkeypatch):
    """Hand-made pretraining data: a part after a gap in the numbering used to be left out with 'done'; an empty
    part stopped only after the others had trained, blaming skipped samples; a VQ token outside the 8192 classes
    stopped in cross_entropy ('Target 9000 is out of bounds'), naming no file or video."""
    a = dict(args, path_data=bad_copy)
    for ext in ('tsv', 'lineidx'):
        os.rename(f'{bad_copy}/img_toyvid_train_1.{ext}', f'{bad_copy}/img_toyvid_train_3.{ext}')
    with pytest.raises(FileNotFoundError, match=r'img_toyvid_train_1.tsv \(the parts are numbered from 0 without '
                                                r'gaps; img_toyvid_train_3.tsv exists\)'):
        dataset.count_parts(a, 'toyvid')
    for ext in ('tsv', 'lineidx'):
        open(f'{bad_copy}/img_toyvid_train_1.{ext}', 'w').close()
    with pytest.raises(ValueError, match=r'img_toyvid_train_1.lineidx: no video \(an empty part or index\)'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'train', 1)
    with open(f'{bad_copy}/img_toyvid_val.lineidx') as f:
        offsets = f.read().split()
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:  # the last videos silently left out before
        f.write('\n'.join(offsets[:-2]) + '\n')
    with pytest.raises(ValueError, match=rf'img_toyvid_val.lineidx: its last line ends at byte {offsets[-2]} of '
                                         rf'{bad_copy}/img_toyvid_val.tsv \(\d+ bytes\): the lines after it are not indexed'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    # one line dropped from the middle of the index: its video was silently left out before
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:
        f.write('\n'.join(offsets[:2] + offsets[3:]) + '\n')
    with pytest.raises(ValueError, match=rf'img_toyvid_val.lineidx: entry 2 is byte {offsets[3]}, but line 2 of '
                                         rf'{bad_copy}/img_toyvid_val.tsv starts at byte {offsets[2]} \(a line dropped '
                                         r'from the index, or an index of another version of the file\?\)'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:  # an entry past the last line
        f.write('\n'.join(offsets + [str(os.path.getsize(f'{bad_copy}/img_toyvid_val.tsv'))]) + '\n')
    with pytest.raises(ValueError, match=rf'img_toyvid_val.lineidx: entry {len(offsets)} \(byte \d+\) is past the last '
                                         rf'of the {len(offsets)} lines of {bad_copy}/img_toyvid_val.tsv'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    # a TSV larger than FULL_CHECK_BYTES (a pretraining part): the offsets ascend, spread lines end where the next start
    monkeypatch.setattr(dataset.TSV, 'FULL_CHECK_BYTES', 0)
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:
        f.write('\n'.join(offsets[:2] + offsets[3:]) + '\n')
    with pytest.raises(ValueError, match=rf'img_toyvid_val.lineidx: the line at entry 1 \(byte {offsets[1]}\) of '
                                         rf'{bad_copy}/img_toyvid_val.tsv ends at byte {offsets[2]}, but entry 2 is byte '
                                         rf'{offsets[3]} \(a line dropped'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:
        f.write('\n'.join([offsets[1], offsets[0]] + offsets[2:]) + '\n')
    with pytest.raises(ValueError, match=rf'img_toyvid_val.lineidx: entry 1 \(byte {offsets[0]}\) does not come after '
                                         rf'entry 0 \(byte {offsets[1]}\)'):
        dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    with open(f'{bad_copy}/img_toyvid_val.lineidx', 'w') as f:
        f.write('\n'.join(offsets) + '\n')
    ds = dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    monkeypatch.undo()
    vid = ds.tsv.read(ds.lineidx[0])[0]
    edit_pickle(f'{bad_copy}/vq_toyvid.pkl', lambda vq: vq[vid].__setitem__((0, 0, 0), 9000))
    ds = dataset.Dataset_Pretrain(a, 'toyvid', 'val')
    with pytest.raises(ValueError, match=rf'vq_toyvid.pkl: video "{vid}" has VQ tokens outside 0..8191 \(min \d+, max 9000\)'):
        ds[0]
    assert dataset.Dataset_Pretrain(dict(a, skip_bad=True), 'toyvid', 'val')[0] is None


def test_tsv_handle_is_closed_with_it(tmp_path):
    """A TSV's file handle was left to the garbage collector: 'ResourceWarning: unclosed file' once per pretraining
    part under `python -W default` (and pytest)."""
    import gc
    import warnings
    (tmp_path / 'a.tsv').write_bytes(b'v0\tx\nv1\ty\n')
    tsv = dataset.TSV(str(tmp_path / 'a.tsv'))
    assert tsv.read(5) == ['v1', 'y']
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter('always', ResourceWarning)
        del tsv
        gc.collect()
    assert not [w for w in said if issubclass(w.category, ResourceWarning)], [str(w.message) for w in said]
