"""Data as it exists today: VIOLETv2's downstream layout, layout conversion, annotation converters, extraction
at scale. Every file here is written by the test itself, in the real formats. Small and CPU-only."""
import base64, io, json, os, pickle, random, re, signal, subprocess, sys, time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, '_tools')
sys.path.insert(0, TOOLS)
import agent  # noqa: E402
import dataset  # noqa: E402
import convert_layout  # noqa: E402

TOK = os.path.join(ROOT, '_data', 'bert-tiny')
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning')


def cli(main, argv, capsys, monkeypatch):
    """Run a tool's main() in-process (a subprocess would spend seconds importing torch) -> (exit code or
    message, stdout)."""
    monkeypatch.setattr(sys, 'argv', ['tool'] + argv)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


# ---- VIOLETv2 frame sampling, against hand-computed indices

EVAL = {  # (count, n) -> indices: round(k * (count-1) / (n-1)), Python's round (half to even); middle when n = 1
    (10, 5): [0, 2, 4, 7, 9],       # step 2.25: 4.5 -> 4
    (16, 5): [0, 4, 8, 11, 15],     # step 3.75: 7.5 -> 8
    (5, 5): [0, 1, 2, 3, 4],
    (7, 3): [0, 3, 6],
    (32, 4): [0, 10, 21, 31],       # step 10.33
    (6, 4): [0, 2, 3, 5],           # step 1.67
    (10, 1): [4],                   # (0 + 9) / 2 = 4.5 -> 4
    (11, 1): [5],
    (2, 2): [0, 1],
}
TRAIN = {  # (count, n, random start) -> indices; stride = ceil(count/n), end = min(start + (n-1)*stride, count-1)
    (10, 5, 0): [0, 2, 4, 6, 8],    # stride 2, end 8
    (10, 5, 1): [1, 3, 5, 7, 9],    # end 9
    (10, 4, 0): [0, 3, 6, 9],       # stride 3, end 9
    (10, 4, 1): [1, 4, 6, 9],       # end clipped 10 -> 9, step 8/3
    (10, 4, 2): [2, 4, 7, 9],       # end clipped 11 -> 9, step 7/3
    (16, 5, 0): [0, 4, 8, 11, 15],  # stride 4, end clipped 16 -> 15
    (16, 5, 2): [2, 5, 8, 12, 15],  # step 13/4: 8.5 -> 8, 11.75 -> 12
    (16, 5, 3): [3, 6, 9, 12, 15],
    (5, 5, 0): [0, 1, 2, 3, 4],
    (7, 1, 4): [4],                 # stride 7: one frame anywhere
    (30, 8, 3): [3, 7, 10, 14, 18, 22, 25, 29],  # stride 4, end clipped 31 -> 29: step 26/7 = 3.71
}


class FixedStart:
    def __init__(self, start, stride):
        self.start, self.stride = start, stride

    def randrange(self, k):
        assert k == self.stride, f'random start drawn from range({k}), expected range({self.stride})'
        return self.start


def test_sample_stored_eval_rule():
    for (count, n), want in EVAL.items():
        assert dataset.sample_stored(count, n, train=False) == want, (count, n)


def test_sample_stored_train_rule():
    for (count, n, start), want in TRAIN.items():
        got = dataset.sample_stored(count, n, train=True, rng=FixedStart(start, -(-count // n)))
        assert got == want, (count, n, start)
    rng = random.Random(0)  # the start covers 0 .. stride-1, nothing else
    assert {dataset.sample_stored(10, 4, True, rng)[0] for _ in range(200)} == {0, 1, 2}


# ---- a VIOLETv2 downstream set, written here

def grey_jpeg(level, size=(32, 32)):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), level, np.uint8)).save(buf, format='JPEG', quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def stored_index(img):
    """Which stored frame a decoded frame is: frame j is grey level 12*j."""
    return int(round(float(img.mean()) * 255 / 12))


COUNTS = {'v_a': 12, 'v_b': 12, 'v_c': 7, 'v_d': 20, 'v_short': 3}  # frames stored per video


def write_v2_set(d, counts=COUNTS):
    """img_msrvtt.tsv + img_msrvtt.id2lineidx.pkl as VIOLETv2 ships them (written by hand, not by our tools:
    rows `vid \\t <second field> \\t b64 ...`), and a txt_<task>.json per task."""
    offsets = {}
    with open(os.path.join(d, 'img_msrvtt.tsv'), 'wb') as f:
        for vid, n in counts.items():
            offsets[vid] = f.tell()
            f.write(('\t'.join([vid, json.dumps({'n': n})] + [grey_jpeg(12 * j) for j in range(n)]) + '\n').encode())
    with open(os.path.join(d, 'img_msrvtt.id2lineidx.pkl'), 'wb') as f:
        pickle.dump(dict(reversed(offsets.items())), f)  # order need not follow the rows
    vids = ['v_a', 'v_b', 'v_c', 'v_d']
    retrieval = {s: [{'video': v, 'caption': f'a video {v}'} for v in vids] for s in ['train', 'val', 'test']}
    qaoe = {s: [{'video': v, 'question': 'what is it?', 'answer': i % 3} for i, v in enumerate(vids)]
            for s in ['train', 'val', 'test']}
    qaoe['ans2label'] = {'y': 1, 'x': 0, 'z': 2}  # VIOLETv2's texts: answer -> label (ours: "vocab", a list)
    qamc = {s: [dict({'video': v, 'question': 'which?', 'answer': i % 5}, **{f'option_{k}': f'o{k}' for k in range(5)})
                for i, v in enumerate(vids)] for s in ['train', 'val', 'test']}
    for task, obj in [('msrvtt-retrieval', retrieval), ('msrvtt-qa', qaoe), ('msrvtt-mc', qamc)]:
        with open(os.path.join(d, f'txt_{task}.json'), 'w') as f:
            json.dump(obj, f)


EVAL_5 = {'v_a': [0, 3, 6, 8, 11], 'v_b': [0, 3, 6, 8, 11],  # step 2.75: 5.5 -> 6
          'v_c': [0, 2, 3, 4, 6],  # step 1.5: 1.5 -> 2, 4.5 -> 4
          'v_d': [0, 5, 10, 14, 19]}  # step 4.75: 9.5 -> 10


@pytest.fixture
def v2_args(tmp_path):
    write_v2_set(str(tmp_path))
    return dict(path_data=str(tmp_path), dataset='msrvtt', txt_backbone=TOK, size_img=32, size_txt=8, size_frame=5)


def test_v2_layout_all_tasks_eval_and_train_sampling(v2_args):
    for cls, task in [(dataset.Dataset_Retrieval, 'msrvtt-retrieval'), (dataset.Dataset_QAOE, 'msrvtt-qa'),
                      (dataset.Dataset_QAMC, 'msrvtt-mc')]:
        for split in ['val', 'test']:
            ds = cls(dict(v2_args, task=task), split)
            assert ds.layout == 'v2' and ds.path_frames.endswith('img_msrvtt.tsv')
            if task == 'msrvtt-qa':
                assert ds.answers == ['x', 'y', 'z']
            for i, item in enumerate(ds.txt):
                img = ds[i][0]
                assert img.shape == (5, 3, 32, 32)
                assert [stored_index(f) for f in img] == EVAL_5[item['video']], (task, split, item['video'])
        ds = cls(dict(v2_args, task=task), 'train')
        starts = set()  # v_a, 12 frames: stride 3, start 0 (end 11, step 2.75), 1 (end 11, step 2.5), 2 (step 2.25)
        for epoch in range(12):  # (each epoch's draw: its seed and the item's index, whatever process draws it)
            ds.draw_seed = epoch
            got = [stored_index(f) for f in ds[0][0]]  # v_a: 12 frames, stride 3
            assert got in ([0, 3, 6, 8, 11], [1, 4, 6, 8, 11], [2, 4, 6, 9, 11])
            assert [stored_index(f) for f in ds[0][0]] == got
            starts.add(got[0])
        assert starts == {0, 1, 2}


def test_v2_layout_choice_and_errors(v2_args, tmp_path):
    a = dict(v2_args, task='msrvtt-retrieval')
    # the config key forces a layout; the files it needs must be there
    with pytest.raises(FileNotFoundError, match='missing data file: .*img_msrvtt.lineidx'):
        dataset.Dataset_Retrieval(dict(a, frame_layout='tsv'), 'val')
    with pytest.raises(FileNotFoundError, match='missing data file: .*img_msrvtt.pkl'):
        dataset.Dataset_Retrieval(dict(a, frame_layout='pkl'), 'val')
    assert dataset.Dataset_Retrieval(dict(a, frame_layout='v2'), 'val').layout == 'v2'
    with pytest.raises(ValueError, match='VIOLETv2 layout stores more frames than are used; set size_frame'):
        dataset.Dataset_Retrieval(dict(a, size_frame=0), 'val')
    # a video with fewer frames than size_frame, an unknown video, a wrong offset: bad samples, named
    ds = dataset.Dataset_Retrieval(dict(a, size_frame=8), 'val')
    with pytest.raises(dataset.BadSample, match='img_msrvtt.tsv: video "v_c" has 7 frames, fewer than size_frame 8'):
        ds[2]
    ds = dataset.Dataset_Retrieval(dict(a, size_frame=8, skip_bad=True), 'val')
    assert ds[2] is None and ds[3][0].shape[0] == 8
    ds = dataset.Dataset_Retrieval(a, 'val')
    ds.txt[0] = {'video': 'v_zz', 'caption': 'x'}
    with pytest.raises(dataset.BadSample, match='img_msrvtt.tsv: no video "v_zz"'):
        ds[0]
    ds.frames['v_a'] = ds.frames['v_b']
    with pytest.raises(dataset.BadSample, match='is "v_b", not "v_a"'):
        ds.get_img('v_a')
    want = [dataset.Dataset_Retrieval(a, 'val')[i][0] for i in range(4)]
    with open(tmp_path / 'img_msrvtt.id2lineidx.pkl', 'rb') as f:
        offsets = pickle.load(f)
    with open(tmp_path / 'img_msrvtt.id2lineidx.pkl', 'wb') as f:  # an index built with numpy: its integers
        pickle.dump({k: np.int64(o) for k, o in offsets.items()}, f)
    ds = dataset.Dataset_Retrieval(a, 'val')
    assert all(torch.equal(ds[i][0], w) for i, w in enumerate(want))
    with open(tmp_path / 'img_msrvtt.id2lineidx.pkl', 'wb') as f:
        pickle.dump(['not', 'a', 'dict'], f)
    with pytest.raises(ValueError, match='img_msrvtt.id2lineidx.pkl: expected a dict video id -> byte offset'):
        dataset.Dataset_Retrieval(a, 'val')
    os.remove(tmp_path / 'img_msrvtt.id2lineidx.pkl')
    with pytest.raises(FileNotFoundError, match=r'img_msrvtt.pkl \(or .*img_msrvtt.tsv \+ .id2lineidx.pkl'):
        dataset.Dataset_Retrieval(a, 'val')


# ---- layout conversion

def test_convert_layout_round_trips(tmp_path, capsys, monkeypatch):
    write_v2_set(str(tmp_path))
    src = str(tmp_path / 'img_msrvtt')
    _, stored = convert_layout.read_frames(src)
    assert {v: len(b) for v, b in stored.items()} == COUNTS
    # v2 -> pkl -> tsv -> v2 -> pkl: every stored frame, unchanged, in every layout
    convert_layout.convert(src, str(tmp_path / 'a'), 'pkl')
    convert_layout.convert(str(tmp_path / 'a'), str(tmp_path / 'b'), 'tsv')
    convert_layout.convert(str(tmp_path / 'b'), str(tmp_path / 'c'), 'v2')
    convert_layout.convert(str(tmp_path / 'c'), str(tmp_path / 'd'), 'pkl')
    for prefix, layout in [('a', 'pkl'), ('b', 'tsv'), ('c', 'v2'), ('d', 'pkl')]:
        assert convert_layout.read_frames(str(tmp_path / prefix)) == (layout, stored)
    assert sorted(os.listdir(tmp_path)) == sorted(['a.pkl', 'b.tsv', 'b.lineidx', 'c.tsv', 'c.id2lineidx.pkl', 'd.pkl',
                                                   'img_msrvtt.tsv', 'img_msrvtt.id2lineidx.pkl', 'txt_msrvtt-mc.json',
                                                   'txt_msrvtt-qa.json', 'txt_msrvtt-retrieval.json'])  # no .tmp left
    with pytest.raises(ValueError, match=r'^--sample must be 0 \(every frame\) or more, got -2$'):
        convert_layout.convert(str(tmp_path / 'a'), str(tmp_path / 'f'), 'pkl', sample=-2)
    # frames as bytes, a video of no frame: read as dataset.py reads them, that video left out and named
    with open(tmp_path / 'raw.pkl', 'wb') as f:
        pickle.dump({'none': [], **{v: [x.encode() for x in b] for v, b in stored.items()}}, f)
    convert_layout.convert(str(tmp_path / 'raw'), str(tmp_path / 'raw_tsv'), 'tsv')
    assert convert_layout.read_frames(str(tmp_path / 'raw_tsv')) == ('tsv', stored)
    assert f'{tmp_path}/raw.pkl: video "none" holds no frame: left out' in capsys.readouterr().err
    for name in ('raw.pkl', 'raw_tsv.tsv', 'raw_tsv.lineidx'):
        os.remove(tmp_path / name)
    # a --dst folder that does not exist yet is made (it was a FileNotFoundError naming Y.tsv.tmp)
    convert_layout.convert(str(tmp_path / 'a'), str(tmp_path / 'new' / 'e'), 'tsv')
    assert convert_layout.read_frames(str(tmp_path / 'new' / 'e')) == ('tsv', stored)
    # our v2 rows: vid, frame count, frames; offsets point at row starts
    data = (tmp_path / 'c.tsv').read_bytes()
    with open(tmp_path / 'c.id2lineidx.pkl', 'rb') as f:
        offsets = pickle.load(f)
    assert data[offsets['v_c']:].split(b'\n')[0].split(b'\t')[:2] == [b'v_c', b'7']

    # --sample 5: v2 -> the original's fixed count, by the evaluation rule; the dataset then reads the same frames
    code, _ = cli(convert_layout.main, [f'--src={src}', '--to=pkl', f'--dst={tmp_path}/s', '--sample=5'], capsys, monkeypatch)
    assert 'video "v_short" has 3 frames, fewer than --sample 5' in code
    del stored['v_short']
    convert_layout.write_frames(stored, str(tmp_path / 'img_ok'), 'v2')
    code, out = cli(convert_layout.main, [f'--src={tmp_path}/img_ok', '--to=pkl', f'--dst={tmp_path}/img_five',
                                          '--sample=5'], capsys, monkeypatch)
    assert code == 0 and f'img_ok (v2) -> {tmp_path}/img_five (pkl): 4 videos' in out
    with open(tmp_path / 'img_five.pkl', 'rb') as f:
        five = pickle.load(f)
    assert five == {v: [b[i] for i in dataset.sample_stored(len(b), 5, False)] for v, b in stored.items()}
    # the files' names work as well as their prefix (--dst img_a.pkl used to write img_a.pkl.pkl)
    code, out = cli(convert_layout.main, [f'--src={tmp_path}/img_five.pkl', '--to=pkl', f'--dst={tmp_path}/img_a.pkl'],
                    capsys, monkeypatch)
    assert code == 0 and open(tmp_path / 'img_a.pkl', 'rb').read() == open(tmp_path / 'img_five.pkl', 'rb').read()
    code, _ = cli(convert_layout.main, [f'--src={tmp_path}/b.tsv', '--to=tsv', f'--dst={tmp_path}/b'], capsys, monkeypatch)
    assert code == '--src and --dst must differ (the source would be overwritten while read)'
    code, _ = cli(convert_layout.main, [f'--src={tmp_path}/nothing', '--to=v2', f'--dst={tmp_path}/x'], capsys, monkeypatch)
    assert f'missing data file: {tmp_path}/nothing.pkl' in code


def test_frame_layout_config_key():
    import agent
    agent.check_keys({'frame_layout': 'v2'}, 'test')
    with pytest.raises(SystemExit, match=r"key 'frame_layout' must be one of \['auto', 'pkl', 'tsv', 'v2'\], got 'v3'"):
        agent.check_keys({'frame_layout': 'v3'}, 'test')


# ---- annotation converters, on files written here in the public formats

import convert_annotations as conv  # noqa: E402


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f)


def msrvtt_info(ids, n_tv, n_caps):
    """A videodatainfo file's content: MSR-VTT puts videos 0..65% in train, the rest of train_val in validate, the
    others in test."""
    return {'info': {'year': 2016},
            'videos': [{'video_id': f'video{i}', 'id': i, 'category': 1, 'url': '', 'start time': 0.0, 'end time': 10.0,
                        'split': 'train' if i < n_tv * 93 // 100 else 'validate' if i < n_tv else 'test'} for i in ids],
            'sentences': [{'caption': f'caption {k} of video {i}', 'video_id': f'video{i}', 'sen_id': i * n_caps + k}
                          for i in ids for k in range(n_caps)]}


def write_msrvtt(d, n_videos=12, n_caps=3, test_ids=(9, 1, 10), merged=False, n_tv=None):
    """MSR-VTT's videodatainfo files (videos 0..69% in train_val, the rest in test, as the release splits them) or
    CLIP4Clip's MSRVTT_data.json (both in one), the 9k-style train list and the JSFusion-style test csv (one sentence
    per test video). -> the train_val videos (the 7k protocol's)."""
    n_tv = n_tv or n_videos * 7 // 10
    if merged:
        write_json(os.path.join(d, 'MSRVTT_data.json'), msrvtt_info(range(n_videos), n_tv, n_caps))
    else:
        for name, ids in [('train_val_videodatainfo.json', range(n_tv)), ('test_videodatainfo.json', range(n_tv, n_videos))]:
            write_json(os.path.join(d, name), msrvtt_info(ids, n_tv, n_caps))
    with open(os.path.join(d, 'MSRVTT_train.9k.csv'), 'w') as f:
        f.write('video_id\n' + ''.join(f'video{i}\n' for i in range(n_videos) if i not in test_ids))
    with open(os.path.join(d, 'MSRVTT_JSFUSION_test.csv'), 'w') as f:
        f.write('key,vid_key,video_id,sentence\n' +
                ''.join(f'ret{j},msr{i},video{i},"a test sentence, for video {i}"\n' for j, i in enumerate(test_ids)))
    return [f'video{i}' for i in range(n_tv)]


@pytest.mark.parametrize('merged', [False, True])
def test_convert_msrvtt_retrieval(tmp_path, capsys, monkeypatch, merged):
    """Train: the 7k videos of train_val (the original's: its released txt_msrvtt-retrieval.json trains on videos below
    video7010 alone) or, --train 9k, CLIP4Clip's list; val = test: JSFusion's pairs. From the release's videodatainfo
    files or from CLIP4Clip's MSRVTT_data.json (which the converter refused as 'missing train_val_videodatainfo.json')."""
    train_val = write_msrvtt(str(tmp_path), merged=merged)
    caps = lambda vids: [{'video': v, 'caption': f'caption {k} of video {v[5:]}'} for v in vids for k in range(3)]
    out, sizes = conv.convert('msrvtt-retrieval', str(tmp_path))
    assert out['train'] == caps(train_val) and len(train_val) == 8
    assert out['test'] == out['val'] == [{'video': f'video{i}', 'caption': f'a test sentence, for video {i}'}
                                         for i in (9, 1, 10)]
    assert sizes == {'train': '8 videos, 24 captions', 'val': '3 videos, 3 captions', 'test': '3 videos, 3 captions'}
    out9, sizes9 = conv.convert('msrvtt-retrieval', str(tmp_path), train='9k')
    assert out9['train'] == caps([f'video{i}' for i in range(12) if i not in (9, 1, 10)]) and out9['test'] == out['test']
    code, printed = cli(conv.main, ['msrvtt-retrieval', f'--src={tmp_path}', f'--out={tmp_path}/txt.json'], capsys, monkeypatch)
    assert code == 0 and '  test: 3 videos, 3 captions (published: 1,000 videos)' in printed
    assert '  train: 8 videos, 24 captions (published: 7,010 videos, 140,200 captions)' in printed
    assert json.load(open(tmp_path / 'txt.json')) == out
    code, printed = cli(conv.main, ['msrvtt-retrieval', f'--src={tmp_path}', f'--out={tmp_path}/9k/txt.json', '--train',
                                    '9k'], capsys, monkeypatch)
    assert code == 0 and '  train: 9 videos, 27 captions (published: 9,000 videos, 180,000 captions)' in printed
    # CLIP4Clip's MSRVTT_train.7k.csv, when there, is the 7k list
    (tmp_path / 'MSRVTT_train.7k.csv').write_text('video_id\nvideo3\nvideo0\n')
    assert conv.convert('msrvtt-retrieval', str(tmp_path))[0]['train'] == caps(['video3', 'video0'])
    os.remove(tmp_path / 'MSRVTT_train.7k.csv')
    # a listed video without captions, a list without its column, a JSFusion row of more or fewer fields or of a
    # video MSR-VTT does not have: named with file and line (they became {"video": null} or a cut sentence, exit 0)
    with open(tmp_path / 'MSRVTT_train.9k.csv', 'a') as f:
        f.write('video77\n')
    with pytest.raises(conv.BadAnnotation, match=r'MSRVTT_train.9k.csv line 11: video "video77" has no caption'):
        conv.convert('msrvtt-retrieval', str(tmp_path), train='9k')
    (tmp_path / 'MSRVTT_train.9k.csv').write_text('vid\nvideo0\n')
    with pytest.raises(conv.BadAnnotation, match=r'MSRVTT_train.9k.csv line 1: no "video_id" column'):
        conv.convert('msrvtt-retrieval', str(tmp_path), train='9k')
    jsfusion = (tmp_path / 'MSRVTT_JSFUSION_test.csv').read_text()
    for row, said in (('ret3,msr5\n', 'line 5: 2 fields, the header has 4 (a comma outside quotes?)'),
                      ('ret3,msr5,video5,a dog runs, fast\n', 'line 5: 5 fields, the header has 4 (a comma outside'),
                      ('ret3,msr5,video5,  \n', 'line 5: "sentence" is empty'),
                      ('ret3,msr5,video99,a dog\n', 'line 5: video "video99" is not an MSR-VTT video of ')):
        (tmp_path / 'MSRVTT_JSFUSION_test.csv').write_text(jsfusion + row)
        with pytest.raises(conv.BadAnnotation, match=re.escape(f'{tmp_path}/MSRVTT_JSFUSION_test.csv {said}')):
            conv.convert('msrvtt-retrieval', str(tmp_path))
    (tmp_path / 'MSRVTT_JSFUSION_test.csv').write_text(jsfusion)
    if not merged:
        os.remove(tmp_path / 'test_videodatainfo.json')
        code, _ = cli(conv.main, ['msrvtt-retrieval', f'--src={tmp_path}', f'--out={tmp_path}/x.json'], capsys, monkeypatch)
        assert code == f'missing annotation file: {tmp_path}/test_videodatainfo.json' and not os.path.exists(tmp_path / 'x.json')


def test_convert_msrvtt_1ka_has_the_published_sizes(tmp_path):
    """At full size (10,000 videos, 20 captions each, JSFusion's 1,000 test videos) the split sizes are the
    published ones, for the 7k protocol and the 9k."""
    write_msrvtt(str(tmp_path), n_videos=10000, n_caps=20, test_ids=range(7010, 8010), n_tv=7010)
    _, sizes = conv.convert('msrvtt-retrieval', str(tmp_path))
    published = conv.PUBLISHED['msrvtt-retrieval']
    assert sizes['train'] == published['train'] == '7,010 videos, 140,200 captions'
    assert sizes['val'] == sizes['test'] == published['test'] + ', 1,000 captions'
    assert conv.convert('msrvtt-retrieval', str(tmp_path), train='9k')[1]['train'] == conv.TRAIN_9K


def write_xu_qa(d, answers, n_val=2, n_test=3):
    """{train,val,test}_qa.json as Xu et al. 2017 release them."""
    for split, ans in [('train', answers), ('val', ['man'] * n_val), ('test', ['dog', 'zebra', 'man'][:n_test] +
                                                                    ['man'] * max(0, n_test - 3))]:
        write_json(os.path.join(d, f'{split}_qa.json'), [
            {'answer': a, 'id': i, 'question': f'what is {i}?', 'video_id': 1 + i % 4, 'category_id': 0}
            for i, a in enumerate(ans)])


def test_convert_msrvtt_qa_and_msvd_qa(tmp_path, capsys, monkeypatch):
    write_xu_qa(str(tmp_path), ['man', 'dog', 'man', 'cat', 'dog', 'man', 'bird', 'cat'])
    out, sizes = conv.convert('msrvtt-qa', str(tmp_path), size_vocab=3)
    # the 3 most frequent ('cat' (2) kept, 'bird' (1) not), in alphabetical order: the class order of the original's
    # released txt_msvd-qa.json (its class 482 is 'man'), which its QA-OE checkpoints' heads were trained on
    assert out['vocab'] == ['cat', 'dog', 'man']
    assert [(it['answer'], it['answer_text']) for it in out['train']] == \
        [(2, 'man'), (1, 'dog'), (2, 'man'), (0, 'cat'), (1, 'dog'), (2, 'man'), (-1, 'bird'), (0, 'cat')]
    assert out['test'][1] == {'video': 'video2', 'question': 'what is 1?', 'answer': -1, 'answer_text': 'zebra'}
    assert sizes['test'] == '3 questions (2 answers in the vocabulary of 3)'
    # the default keeps the 1,000 most frequent: all 4 here; ties go to the first seen
    assert conv.convert('msrvtt-qa', str(tmp_path))[0]['vocab'] == ['bird', 'cat', 'dog', 'man']
    assert conv.answer_vocab(['b', 'a', 'a', 'b', 'c'], 2) == ['b', 'a']

    # MSVD-QA: video ids through youtube_mapping.txt; the published test size
    write_xu_qa(str(tmp_path), ['man', 'dog'], n_test=13157)
    (tmp_path / 'youtube_mapping.txt').write_text(''.join(f'clip_{k}_5_15 vid{k}\n' for k in range(1, 5)))
    code, printed = cli(conv.main, ['msvd-qa', f'--src={tmp_path}', f'--out={tmp_path}/txt_msvd-qa.json'], capsys, monkeypatch)
    assert code == 0 and '  test: 13,157 questions' in printed and '(published: 13,157 questions)' in printed
    out = json.load(open(tmp_path / 'txt_msvd-qa.json'))
    assert len(out['test']) == 13157 and out['train'][0]['video'] == 'clip_1_5_15' and out['vocab'] == ['dog', 'man']
    (tmp_path / 'youtube_mapping.txt').write_text('clip_1 vid1\nclip_2 vid2\n')
    with pytest.raises(conv.BadAnnotation, match=r'test_qa.json\[2\]: video_id 3 \(vid3\) is not in .*youtube_mapping.txt'):
        conv.convert('msvd-qa', str(tmp_path))
    (tmp_path / 'youtube_mapping.txt').write_text('clip_1 vid1\nbroken line here\n')
    with pytest.raises(conv.BadAnnotation, match=r'youtube_mapping.txt line 2: expected "<clip name> vid<k>"'):
        conv.convert('msvd-qa', str(tmp_path))
    write_json(tmp_path / 'val_qa.json', [{'answer': 'a', 'id': 0, 'video_id': 1}])
    with pytest.raises(conv.BadAnnotation, match=r'val_qa.json\[0\]: no key "question"'):
        conv.convert('msrvtt-qa', str(tmp_path))
    (tmp_path / 'val_qa.json').write_text('[{"answer": ')
    with pytest.raises(conv.BadAnnotation, match=r'val_qa.json: not valid JSON'):
        conv.convert('msrvtt-qa', str(tmp_path))
    # entries of the wrong types were written as "video[1]" / "question": null; --out onto an input replaced it
    write_json(tmp_path / 'val_qa.json', [{'answer': 'a', 'id': 0, 'video_id': [1], 'question': None}])
    with pytest.raises(conv.BadAnnotation, match=r'val_qa.json\[0\]: "question" must be a str and "video_id" an int or str, '
                                                  r'got None and \[1\]'):
        conv.convert('msrvtt-qa', str(tmp_path))
    write_xu_qa(str(tmp_path), ['man', 'dog'])
    code, _ = cli(conv.main, ['msrvtt-qa', f'--src={tmp_path}', f'--out={tmp_path}/train_qa.json'], capsys, monkeypatch)
    assert code == f'--out {tmp_path}/train_qa.json is a file of --src (an annotation file): write the txt_<task>.json elsewhere'
    code, _ = cli(conv.main, ['msrvtt-qa', f'--src={tmp_path}', f'--out={tmp_path}/t.json', '--size_vocab=0'], capsys, monkeypatch)
    assert code == 2 and not os.path.exists(tmp_path / 't.json')  # (argparse's error: a vocabulary of 0 answers)


TGIF_HEADER = 'gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\n'


def test_convert_tgif_action_and_transition(tmp_path, capsys, monkeypatch):
    rows = {'Train_action': ['tumblr_a1\tWhat does the man do 3 times ?\tnod\tjump\tclap\twave\tsit\t3\tACTION1\t5',
                             'tumblr_b2\tWhat does the cat do 2 times ?\tlick\trun\tsit\tblink\tjump\t0\tACTION2\t9'],
            'Test_action': ['tumblr_c3\tWhat does the dog do 4 times ?\tbark\trun\tsit\tspin\tjump\t4\tACTION7\t11'],
            'Train_transition': ['tumblr_a1\tWhat does the man do before jump ?\tnod\tjump\tclap\twave\tsit\t1\tTRANS1\t5'],
            'Test_transition': ['tumblr_c3\tWhat does the dog do after bark ?\tbark\trun\tsit\tspin\tjump\t2\tTRANS4\t11',
                                'tumblr_d4\tWhat does the girl do after smile ?\ta\tb\tc\td\te\t0\tTRANS5\t12']}
    for name, lines in rows.items():
        (tmp_path / f'{name}_question.csv').write_text(TGIF_HEADER + '\n'.join(lines) + '\n')
    out, sizes = conv.convert('tgif-action', str(tmp_path))
    assert out['train'][0] == {'video': 'tumblr_a1', 'question': 'What does the man do 3 times ?', 'answer': 3,
                               'option_0': 'nod', 'option_1': 'jump', 'option_2': 'clap', 'option_3': 'wave',
                               'option_4': 'sit'}
    assert out['val'] == out['test'] and out['test'][0]['answer'] == 4
    assert sizes == {'train': '2 questions', 'val': '1 questions', 'test': '1 questions'}
    code, printed = cli(conv.main, ['tgif-transition', f'--src={tmp_path}', f'--out={tmp_path}/t.json'], capsys, monkeypatch)
    assert code == 0 and '  test: 2 questions (published: 6,232 questions)' in printed
    assert [it['answer'] for it in json.load(open(tmp_path / 't.json'))['test']] == [2, 0]
    # the json is what Dataset_QAMC reads: every key it needs
    assert all(k in out['train'][1] for k in ['video', 'question', 'answer'] + [f'option_{i}' for i in range(5)])
    # saved again by a Windows tool (a BOM, CRLF line ends): the same questions (the BOM failed the header check)
    for name, lines in rows.items():
        (tmp_path / f'{name}_question.csv').write_text(TGIF_HEADER + '\n'.join(lines) + '\n', encoding='utf-8-sig',
                                                       newline='\r\n')
    assert conv.convert('tgif-action', str(tmp_path)) == (out, sizes)
    (tmp_path / 'Test_action_question.csv').write_text(TGIF_HEADER + rows['Test_action'][0].replace('dog', 'caf\u00e9'),
                                                       encoding='cp1252')
    code, _ = cli(conv.main, ['tgif-action', f'--src={tmp_path}', f'--out={tmp_path}/a.json'], capsys, monkeypatch)
    assert code == f'{tmp_path}/Test_action_question.csv: not UTF-8 text (byte 0xe9 at offset 78): save it as UTF-8'
    (tmp_path / 'Test_action_question.csv').write_text(TGIF_HEADER + rows['Test_action'][0].replace('\t4\t', '\t7\t') + '\n')
    with pytest.raises(conv.BadAnnotation, match=r"Test_action_question.csv line 2: answer '7' is not an option index 0-4"):
        conv.convert('tgif-action', str(tmp_path))
    (tmp_path / 'Test_action_question.csv').write_text(TGIF_HEADER + '\n\ntumblr_x\tshort row\n')
    with pytest.raises(conv.BadAnnotation, match=r'Test_action_question.csv line 4: 2 tab-separated fields, expected 10'):
        conv.convert('tgif-action', str(tmp_path))
    (tmp_path / 'Test_action_question.csv').write_text(TGIF_HEADER.replace('\t', ',') + '\n')
    with pytest.raises(conv.BadAnnotation, match=r'Test_action_question.csv line 1: expected the header'):
        conv.convert('tgif-action', str(tmp_path))
    # a question holding U+0085 (NEL) or U+2028: one line still (str.splitlines cut it in two: '2 fields, expected 10')
    (tmp_path / 'Test_action_question.csv').write_text(TGIF_HEADER + rows['Test_action'][0].replace(' do 4', ' do\u0085\u2028 4'))
    assert conv.convert('tgif-action', str(tmp_path))[0]['test'][0]['question'] == 'What does the dog do\u0085\u2028 4 times ?'


def round_trip(d, out, task, dataset_name, cls, **args):
    """Write the converted json as txt_<task>.json beside a frames file of its videos (5 grey frames each) and read
    every split back through the project's dataset class -> {split: the dataset}."""
    videos = {it['video'] for split in ['train', 'val', 'test'] for it in out.get(split, [])}
    with open(os.path.join(d, f'img_{dataset_name}.pkl'), 'wb') as f:
        pickle.dump({v: [grey_jpeg(12 * j) for j in range(5)] for v in sorted(videos)}, f)
    write_json(os.path.join(d, f'txt_{task}.json'), out)
    sets = {}
    for split in [s for s in ['train', 'val', 'test'] if s in out]:
        ds = cls(dict(path_data=d, dataset=dataset_name, task=task, txt_backbone=TOK, size_img=32, size_txt=16,
                      size_frame=5, size_option=5, **args), split)
        ds.check_items()
        if cls is dataset.Dataset_Retrieval:  # (img, txt, mask): the caption's tokens
            assert [ds.tokzr.decode(ds[i][1][ds[i][2].astype(bool)][1:-1]) for i in range(len(ds))] == \
                [ds.tokzr.decode(ds.tokzr.encode(it['caption'], add_special_tokens=False)[:ds.size_txt - 2])
                 for it in out[split]]
        else:
            assert [ds[i][-1] for i in range(len(ds))] == [it['answer'] for it in out[split]]
        sets[split] = ds
    return sets


FRAMEQA_HEADER = 'gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n'


def missing_is_named(task, tmp_path, name, capsys, monkeypatch):
    """The converter's one line for an annotation file that is not there (it is removed here), nothing written."""
    os.remove(tmp_path / name)
    code, _ = cli(conv.main, [task, f'--src={tmp_path}', f'--out={tmp_path}/x.json'], capsys, monkeypatch)
    assert code == f'missing annotation file: {tmp_path}/{name}' and not os.path.exists(tmp_path / 'x.json')


def test_convert_tgif_frame(tmp_path, capsys, monkeypatch):
    """TGIF-QA FrameQA (open-ended) -> QA-OE as MSRVTT-QA's: the vocabulary rule, -1 outside it, val = test."""
    train = ['tumblr_a1\twhat is the color of the shirt ?\twhite\t2\tFRAMEQA1\t10\ta man in a white shirt nods .',
             'tumblr_b2\thow many dogs are running ?\ttwo\t1\tFRAMEQA2\t11\ttwo dogs are running .',
             'tumblr_c3\twhat is the color of the car ?\twhite\t2\tFRAMEQA3\t12\ta white car turns .',
             'tumblr_d4\twhat is the cat eating ?\tfish\t0\tFRAMEQA4\t13\ta cat is eating a fish .',
             'tumblr_e5\twhere is the man dancing . ?\troom\t3\tFRAMEQA5\t14\ta man is dancing in a room .',
             'tumblr_b2\thow many men are singing ?\ttwo\t1\tFRAMEQA6\t11\ttwo men are singing .']
    test = ['tumblr_x9\twhat is the color of the hat ?\tblack\t2\tFRAMEQA7\t20\ta man in a black hat waves .',
            'tumblr_a1\thow many women are walking ?\ttwo\t1\tFRAMEQA8\t10\ttwo women are walking .']
    (tmp_path / 'Train_frameqa_question.csv').write_text(FRAMEQA_HEADER + '\n'.join(train) + '\n')
    (tmp_path / 'Test_frameqa_question.csv').write_text(FRAMEQA_HEADER + '\n'.join(test) + '\n')
    out, sizes = conv.convert('tgif-frame', str(tmp_path), size_vocab=3)
    # 'two' and 'white' twice, then 'fish' first seen of the ones seen once; alphabetical
    assert out['vocab'] == ['fish', 'two', 'white']
    assert out['train'][0] == {'video': 'tumblr_a1', 'question': 'what is the color of the shirt ?', 'answer': 2,
                               'answer_text': 'white'}
    assert [it['answer'] for it in out['train']] == [2, 1, 2, 0, -1, 1]
    assert out['val'] == out['test'] == [
        {'video': 'tumblr_x9', 'question': 'what is the color of the hat ?', 'answer': -1, 'answer_text': 'black'},
        {'video': 'tumblr_a1', 'question': 'how many women are walking ?', 'answer': 1, 'answer_text': 'two'}]
    assert sizes['test'] == '2 questions (1 answers in the vocabulary of 3)'
    code, printed = cli(conv.main, ['tgif-frame', f'--src={tmp_path}', f'--out={tmp_path}/o/txt.json', '--size_vocab=3'],
                        capsys, monkeypatch)
    assert code == 0 and '  train: 6 questions (5 answers in the vocabulary of 3) (published: 39,392 questions)' in printed
    assert '  val: 2 questions (1 answers in the vocabulary of 3) (published: 13,691 questions)' in printed
    sets = round_trip(str(tmp_path), out, 'tgif-frame', 'tgif', dataset.Dataset_QAOE)
    assert sets['train'].answers == ['fish', 'two', 'white'] and sets['train'].size_vocab == 3
    # another question type's file (Count: gif_name, question, answer, vid_id, key) and a row cut short are named
    (tmp_path / 'Test_frameqa_question.csv').write_text('gif_name\tquestion\tanswer\tvid_id\tkey\n'
                                                        'tumblr_x9\thow many times does he nod ?\t3\tCOUNT1\t20\n')
    with pytest.raises(conv.BadAnnotation, match=re.escape(f"{tmp_path}/Test_frameqa_question.csv line 1: expected the "
                                                           f"header {conv.TGIF_FRAME_COLUMNS} (tab separated)")):
        conv.convert('tgif-frame', str(tmp_path))
    (tmp_path / 'Test_frameqa_question.csv').write_text(FRAMEQA_HEADER + test[0] + '\ntumblr_y\twhat is it ?\n')
    with pytest.raises(conv.BadAnnotation, match=r'Test_frameqa_question.csv line 3: 2 tab-separated fields, expected 7'):
        conv.convert('tgif-frame', str(tmp_path))
    (tmp_path / 'Test_frameqa_question.csv').write_text(FRAMEQA_HEADER + test[0].replace('\tblack\t', '\t \t') + '\n')
    with pytest.raises(conv.BadAnnotation, match=r'Test_frameqa_question.csv line 2: the answer is empty'):
        conv.convert('tgif-frame', str(tmp_path))
    missing_is_named('tgif-frame', tmp_path, 'Train_frameqa_question.csv', capsys, monkeypatch)


MSR_MC_HEADER = 'key\tvid_key\tvideo_id\ta1\ta2\ta3\ta4\ta5\tanswer\n'


def test_convert_msrvtt_mc(tmp_path, capsys, monkeypatch):
    """JSFusion's MSR_MC_test.csv -> caption-choice QA-MC items (empty question), val = test, no train: --eval scores
    it (a retrieval or pretraining checkpoint), training is refused for want of a "train" split."""
    rows = ['mc0\tmsr7010\tvideo7010\ta man is singing\ta dog runs\ta car drives\ta girl dances\ta cat sleeps\t0',
            'mc1\tmsr7012\tvideo7012\ta boy swims\tpeople cook food\ta plane lands\ta man talks\ta baby laughs\t3',
            'mc2\tmsr7011\tvideo7011\tcartoon, with music\ta race\ta song\ta game\ta show\t4']
    (tmp_path / 'MSR_MC_test.csv').write_text(MSR_MC_HEADER + '\n'.join(rows) + '\n')
    out, sizes = conv.convert('msrvtt-mc', str(tmp_path))
    assert set(out) == {'val', 'test'} and out['val'] == out['test']
    assert out['test'][1] == {'video': 'video7012', 'question': '', 'answer': 3, 'option_0': 'a boy swims',
                              'option_1': 'people cook food', 'option_2': 'a plane lands', 'option_3': 'a man talks',
                              'option_4': 'a baby laughs'}
    assert [(it['video'], it['answer'], it['option_0']) for it in out['test']] == [
        ('video7010', 0, 'a man is singing'), ('video7012', 3, 'a boy swims'), ('video7011', 4, 'cartoon, with music')]
    assert sizes == {'val': '3 questions', 'test': '3 questions'}
    code, printed = cli(conv.main, ['msrvtt-mc', f'--src={tmp_path}', f'--out={tmp_path}/o/txt_msrvtt-mc.json'], capsys,
                        monkeypatch)
    assert code == 0 and '  test: 3 questions (published: 2,990 questions)' in printed and '  train:' not in printed
    round_trip(str(tmp_path), out, 'msrvtt-mc', 'msrvtt', dataset.Dataset_QAMC)
    said = capsys.readouterr()
    assert '3 of 3 items have an empty "question"' in said.out + said.err
    with pytest.raises(dataset.DataError, match=r'txt_msrvtt-mc.json: no key "train"'):
        dataset.Dataset_QAMC(dict(path_data=str(tmp_path), dataset='msrvtt', task='msrvtt-mc', txt_backbone=TOK,
                                  size_img=32, size_txt=16, size_frame=5, size_option=5), 'train')
    # without the video_id column the video is vid_key's; a video_id that disagrees, a vid_key that is not msr<k>,
    # an answer out of 0-4 (1-5 would be a shifted key) and a missing column are named
    (tmp_path / 'MSR_MC_test.csv').write_text(MSR_MC_HEADER.replace('video_id\t', '') +
                                              ''.join(r.replace(f'\tvideo{k}', '') + '\n'
                                                      for r, k in zip(rows, (7010, 7012, 7011))))
    assert conv.convert('msrvtt-mc', str(tmp_path)) == (out, sizes)
    for row, said in ((rows[1].replace('\tvideo7012\t', '\tvideo12\t'), "video_id 'video12' is not vid_key 'msr7012'"
                                                                         "'s video 'video7012'"),
                      (rows[1].replace('msr7012', '7012'), "vid_key '7012' is not \"msr<k>\""),
                      (rows[1][:-1] + '5', "answer '5' is not an option index 0-4"),
                      (rows[1].replace('\ta baby laughs', ''), '8 tab-separated fields, the header has 9')):
        (tmp_path / 'MSR_MC_test.csv').write_text(MSR_MC_HEADER + rows[0] + '\n' + row + '\n')
        with pytest.raises(conv.BadAnnotation, match=re.escape(f'{tmp_path}/MSR_MC_test.csv line 3: {said}')):
            conv.convert('msrvtt-mc', str(tmp_path))
    (tmp_path / 'MSR_MC_test.csv').write_text(MSR_MC_HEADER.replace('answer', 'label') + rows[0] + '\n')
    with pytest.raises(conv.BadAnnotation, match=r'MSR_MC_test.csv line 1: no "answer" column \(tab separated; has'):
        conv.convert('msrvtt-mc', str(tmp_path))


def test_convert_lsmdc_mc(tmp_path, capsys, monkeypatch):
    """The LSMDC 2016 Movie Multiple-Choice files (no header): train / valid with the correct sentence first (moved to a
    place drawn from the clip id), the randomized public test with its answer's index 1-5 (-> 0-4); the video is the
    clip id."""
    times = '01.02.27.034\t01.02.29.100\t01.02.27.000\t01.02.29.134'
    files = {'LSMDC16_multiple_choice_train.csv': [
                 f'0001_American_Beauty_00.00.51.926-00.00.54.206\t{times}\tSomeone opens the door.\tSomeone eats.\t'
                 f'Someone swims.\tSomeone drives off.\tSomeone sings.',
                 f'0001_American_Beauty_00.01.00.000-00.01.02.000\t{times}\tHe smiles.\tShe runs.\tThey fight.\t'
                 f'He sleeps.\tShe waves.'],
             'LSMDC16_multiple_choice_valid.csv': [
                 f'1001_Flight_00.00.10.000-00.00.12.000\t{times}\tThe plane lands.\tA dog barks.\tSomeone reads.\t'
                 f'He cries.\tShe laughs.'],
             'LSMDC16_multiple_choice_test_randomized.csv': [
                 f'3001_21_JUMP_STREET_00.03.07.077-00.03.07.559\t{times}\tHe jumps.\tShe sits.\tThey run.\tHe falls.\t'
                 f'Someone nods.\t4 ',
                 f'3001_21_JUMP_STREET_00.04.00.000-00.04.02.000\t{times}\tA car stops.\tHe eats.\tShe reads.\t'
                 f'They dance.\tSomeone sings.\t1']}
    for name, lines in files.items():
        (tmp_path / name).write_text('\n'.join(lines) + '\n')
    out, sizes = conv.convert('lsmdc-mc', str(tmp_path))
    # train / valid: the right (first) sentence moved to a place drawn from the clip id, the same every conversion
    for it, line in zip(out['train'] + out['val'], files['LSMDC16_multiple_choice_train.csv'] +
                        files['LSMDC16_multiple_choice_valid.csv']):
        row = line.split('\t')
        assert it['video'] == row[0] and it['question'] == '' and it[f'option_{it["answer"]}'] == row[5]
        assert sorted(it[f'option_{i}'] for i in range(5)) == sorted(row[5:10])
    assert [it['answer'] for it in out['train'] + out['val']] != [0, 0, 0]
    assert conv.convert('lsmdc-mc', str(tmp_path))[0] == out
    assert [(it['answer'], it['option_0'], it['option_4']) for it in out['test']] == [
        (3, 'He jumps.', 'Someone nods.'), (0, 'A car stops.', 'Someone sings.')]
    assert out['val'][0]['video'] == '1001_Flight_00.00.10.000-00.00.12.000'
    assert sizes == {'train': '2 questions', 'val': '1 questions', 'test': '2 questions'}
    code, printed = cli(conv.main, ['lsmdc-mc', f'--src={tmp_path}', f'--out={tmp_path}/o/txt_lsmdc-mc.json'], capsys,
                        monkeypatch)
    assert code == 0 and '  train: 2 questions (published: 101,079 questions)' in printed
    assert '  test: 2 questions (published: 10,053 questions)' in printed
    round_trip(str(tmp_path), out, 'lsmdc-mc', 'lsmdc', dataset.Dataset_QAMC)
    # a train row with a test row's answer column, a test row without it, an answer out of 1-5 (0: a 0-based key)
    test = tmp_path / 'LSMDC16_multiple_choice_test_randomized.csv'
    (tmp_path / 'LSMDC16_multiple_choice_train.csv').write_text(files['LSMDC16_multiple_choice_test_randomized.csv'][0])
    with pytest.raises(conv.BadAnnotation, match=re.escape(
            f'{tmp_path}/LSMDC16_multiple_choice_train.csv line 1: 11 tab-separated fields, expected 10 (<CLIP_ID>, 4 '
            f'time stamps, the correct sentence, 4 distractors)')):
        conv.convert('lsmdc-mc', str(tmp_path))
    (tmp_path / 'LSMDC16_multiple_choice_train.csv').write_text('\n'.join(files['LSMDC16_multiple_choice_train.csv']))
    for row, said in ((files['LSMDC16_multiple_choice_valid.csv'][0], '10 tab-separated fields, expected 11 (<CLIP_ID>, '
                                                                     '4 time stamps, 5 sentences, the answer 1-5)'),
                      (files['LSMDC16_multiple_choice_test_randomized.csv'][1][:-1] + '0',
                       "answer '0' is not an option index 1-5")):
        test.write_text(files['LSMDC16_multiple_choice_test_randomized.csv'][0] + '\n' + row + '\n')
        with pytest.raises(conv.BadAnnotation, match=re.escape(f'{test} line 2: {said}')):
            conv.convert('lsmdc-mc', str(tmp_path))
    missing_is_named('lsmdc-mc', tmp_path, 'LSMDC16_multiple_choice_valid.csv', capsys, monkeypatch)


LSMDC_TIMES = '00.00.51.926\t00.00.54.206\t00.00.51.900\t00.00.54.300'


def test_convert_lsmdc_retrieval(tmp_path, capsys, monkeypatch):
    """LSMDC 2016's annotation files (tab separated, no header: clip id, 4 time stamps, sentence) -> one item per line,
    the clip id its video; train / val / test from LSMDC16_annos_training / _val and the 1,000-clip public test."""
    files = {'LSMDC16_annos_training.csv': [
                 f'0001_American_Beauty_00.00.51.926-00.00.54.206\t{LSMDC_TIMES}\t"Stop," SOMEONE says, and opens the door.',
                 f'0001_American_Beauty_00.00.51.926-00.00.54.206\t{LSMDC_TIMES}\tShe looks up.',
                 f'0002_As_Good_As_It_Gets_00.01.00.000-00.01.02.000\t{LSMDC_TIMES}\tHe walks his dog.\t '],  # (a tab at
             # the end of a line is no field: it was a line of 7 fields)
             'LSMDC16_annos_val.csv': [f'1001_Flight_00.00.10.000-00.00.12.000\t{LSMDC_TIMES}\tThe plane lands.'],
             'LSMDC16_challenge_1000_publictect.csv': [
                 f'3001_21_JUMP_STREET_00.03.07.077-00.03.07.559\t{LSMDC_TIMES}\tHe jumps.',
                 f'3001_21_JUMP_STREET_00.04.00.000-00.04.02.000\t{LSMDC_TIMES}\tA car stops.']}
    for name, lines in files.items():
        (tmp_path / name).write_text('\n'.join(lines) + '\n')
    out, sizes = conv.convert('lsmdc-retrieval', str(tmp_path))
    assert out == {
        'train': [{'video': '0001_American_Beauty_00.00.51.926-00.00.54.206', 'caption': '"Stop," SOMEONE says, and opens the door.'},
                  {'video': '0001_American_Beauty_00.00.51.926-00.00.54.206', 'caption': 'She looks up.'},
                  {'video': '0002_As_Good_As_It_Gets_00.01.00.000-00.01.02.000', 'caption': 'He walks his dog.'}],
        'val': [{'video': '1001_Flight_00.00.10.000-00.00.12.000', 'caption': 'The plane lands.'}],
        'test': [{'video': '3001_21_JUMP_STREET_00.03.07.077-00.03.07.559', 'caption': 'He jumps.'},
                 {'video': '3001_21_JUMP_STREET_00.04.00.000-00.04.02.000', 'caption': 'A car stops.'}]}
    assert sizes == {'train': '2 videos, 3 captions', 'val': '1 videos, 1 captions', 'test': '2 videos, 2 captions'}
    code, printed = cli(conv.main, ['lsmdc-retrieval', f'--src={tmp_path}', f'--out={tmp_path}/o/txt_lsmdc-retrieval.json'],
                        capsys, monkeypatch)
    assert code == 0 and '  train: 2 videos, 3 captions (published: 101,079 videos)' in printed
    assert '  val: 1 videos, 1 captions (published: 7,408 videos)' in printed
    assert '  test: 2 videos, 2 captions (published: 1,000 videos)' in printed
    assert json.load(open(tmp_path / 'o' / 'txt_lsmdc-retrieval.json')) == out
    round_trip(str(tmp_path), out, 'lsmdc-retrieval', 'lsmdc', dataset.Dataset_Retrieval)
    # a row of the multiple-choice files (10 fields), a line without its sentence (or only white space), an empty clip id
    test = tmp_path / 'LSMDC16_challenge_1000_publictect.csv'
    for row, said in ((f'3001_X_00.00.01.000-00.00.02.000\t{LSMDC_TIMES}\tHe jumps.\tShe sits.\tThey run.\tHe falls.\t'
                       f'Someone nods.', '10 tab-separated fields, expected 6 (<CLIP_ID>, 4 time stamps, <SENTENCE>)'),
                      (f'3001_X_00.00.01.000-00.00.02.000\t{LSMDC_TIMES}', '5 tab-separated fields, expected 6'),
                      (f'3001_X_00.00.01.000-00.00.02.000\t{LSMDC_TIMES}\t  ', '5 tab-separated fields, expected 6'),
                      (f' \t{LSMDC_TIMES}\tHe jumps.', 'the clip id is empty')):
        test.write_text(files['LSMDC16_challenge_1000_publictect.csv'][0] + '\n' + row + '\n')
        with pytest.raises(conv.BadAnnotation, match=re.escape(f'{test} line 2: {said}')):
            conv.convert('lsmdc-retrieval', str(tmp_path))
    missing_is_named('lsmdc-retrieval', tmp_path, 'LSMDC16_annos_val.csv', capsys, monkeypatch)


def didemo_entry(k, video, description, times=((0, 0),)):
    """One moment of DiDeMo's {split}_data.json as LisaAnne/LocalizingMoments releases it."""
    return {'annotation_id': k, 'description': description, 'video': video, 'times': [list(t) for t in times],
            'dl_link': f'https://www.flickr.com/video_download.gne?id={k}', 'num_segments': 6}


def test_convert_didemo_retrieval(tmp_path, capsys, monkeypatch):
    """DiDeMo's train/val/test_data.json -> paragraph-to-video retrieval: one item per video, its descriptions in file
    order joined by a space (a repeated one kept), the "video" field as it is (extension included) the video."""
    a, b, c = '54322086@N00_2408598493_274c77d26a.avi', '10015567@N08_3655084291_d8b58466fa.mov', '8748128@N02_4876462651_bf3ec244f9.mp4'
    write_json(tmp_path / 'train_data.json', [
        didemo_entry(0, a, 'a man walks into the room', [(0, 0), (0, 1), (0, 0), (0, 0)]),
        didemo_entry(1, b, 'the dog jumps'),
        didemo_entry(2, a, 'he sits down on a red chair'),
        didemo_entry(3, a, 'the camera pans left'),
        didemo_entry(4, b, 'the dog jumps'),
        didemo_entry(5, a, 'someone opens the door and a woman with a long blue coat comes in from the rain outside')])
    write_json(tmp_path / 'val_data.json', [didemo_entry(0, c, 'a car drives by'), didemo_entry(1, c, 'it stops')])
    write_json(tmp_path / 'test_data.json', [didemo_entry(0, b, 'the dog runs')])
    out, sizes = conv.convert('didemo-retrieval', str(tmp_path))
    # the ids are those extraction gives the videos as the AWS download script saves them, <video>.mp4
    (tmp_path / 'videos').mkdir()
    for video in (a, b, c):
        (tmp_path / 'videos' / f'{video}.mp4').write_bytes(b'')
    extracted = sorted(vid for vid, _ in frame_tool.list_videos(str(tmp_path / 'videos')))
    assert sorted(it['video'] for s in ('train', 'val') for it in out[s]) == extracted
    a, b, c = a, b, c[:-len('.mp4')]
    assert out == {'train': [{'video': a, 'caption': 'a man walks into the room he sits down on a red chair the camera '
                                                     'pans left someone opens the door and a woman with a long blue coat '
                                                     'comes in from the rain outside'},
                             {'video': b, 'caption': 'the dog jumps the dog jumps'}],
                   'val': [{'video': c, 'caption': 'a car drives by it stops'}],
                   'test': [{'video': b, 'caption': 'the dog runs'}]}
    assert sizes == {'train': '2 videos, 2 captions', 'val': '1 videos, 1 captions', 'test': '1 videos, 1 captions'}
    code, printed = cli(conv.main, ['didemo-retrieval', f'--src={tmp_path}', f'--out={tmp_path}/o/txt_didemo-retrieval.json'],
                        capsys, monkeypatch)
    assert code == 0 and '  train: 2 videos, 2 captions (published: 8,395 videos)' in printed
    assert '  test: 1 videos, 1 captions (published: 1,004 videos)' in printed
    # read back: a paragraph longer than size_txt is cut to its first size_txt - 2 word pieces ([CLS] and [SEP])
    sets = round_trip(str(tmp_path), out, 'didemo-retrieval', 'didemo', dataset.Dataset_Retrieval)
    ds = sets['train']
    assert len(ds.tokzr.tokenize(out['train'][0]['caption'])) > ds.size_txt == 16
    txt, mask = ds[0][1], ds[0][2]
    assert mask.all() and ds.tokzr.decode(txt[1:-1]) == 'a man walks into the room he sits down on a red chair the'
    # an entry without its description, a description that is not text, a video field that is empty, a file that is
    # not a list, videos of only empty descriptions
    for entries, said in (([{'annotation_id': 0, 'video': a}], '[0]: no key "description"'),
                          ([didemo_entry(0, a, 'ok'), didemo_entry(1, a, ['a', 'list'])],
                           '[1]: "video" must be a non-empty str and "description" a str, got '
                           "'54322086@N00_2408598493_274c77d26a.avi' and ['a', 'list']"),
                          ([didemo_entry(0, ' ', 'a dog')], '[0]: "video" must be a non-empty str'),
                          ({'video': a}, ': expected a list of annotations, got dict'),
                          ([didemo_entry(0, a, ' '), didemo_entry(1, a, '')], f': video "{a}" has only empty descriptions')):
        write_json(tmp_path / 'val_data.json', entries)
        with pytest.raises(conv.BadAnnotation, match=re.escape(f'{tmp_path}/val_data.json{said}')):
            conv.convert('didemo-retrieval', str(tmp_path))
    write_json(tmp_path / 'val_data.json', [didemo_entry(0, c, 'a car drives by')])
    missing_is_named('didemo-retrieval', tmp_path, 'test_data.json', capsys, monkeypatch)


def test_convert_webvid_and_cc3m_pretraining_texts(tmp_path, capsys, monkeypatch):
    """WebVid's and Conceptual Captions' files as they are downloaded -> txt_<dataset>.json as the original's (video
    id -> [caption]): there was no route from them (an 'invalid choice' of task)."""
    header = 'videoid,name,page_idx,page_dir,duration,contentUrl\n'
    (tmp_path / 'results_2M_train.csv').write_text(
        header + '31353427,"Merida, mexico - may 23, 2017: tourists are walking",1,000001_000050,PT00H00M11S,https://x/1.mp4\n'
        '14069897,"Close up of filling a cup with boiling water from a kettle.\n\n",1,000001_000050,PT00H00M20S,https://x/2.mp4\n',
        encoding='utf-8')
    (tmp_path / 'results_2M_val.csv').write_text(header + '1066674784,Fun clown - 3d animation,7,000301_000350,PT00H00M09S,u\n')
    out, sizes = conv.convert('webvid2.5m', str(tmp_path))
    assert out == {'train': {'31353427': ['Merida, mexico - may 23, 2017: tourists are walking'],
                             '14069897': ['Close up of filling a cup with boiling water from a kettle.\n\n']},
                   'val': {'1066674784': ['Fun clown - 3d animation']}}
    assert sizes == {'train': '2 videos', 'val': '1 videos'}
    code, printed = cli(conv.main, ['webvid2.5m', f'--src={tmp_path}', f'--out={tmp_path}/d/txt_webvid2.5m.json'], capsys,
                        monkeypatch)
    assert code == 0 and '  val: 1 videos (published: 5,000 videos)' in printed and '  test:' not in printed
    assert dataset.load_captions(f'{tmp_path}/d/txt_webvid2.5m.json', 'train') == out['train']  # what pretraining reads
    (tmp_path / 'results_2M_val.csv').write_text(header + '1066674784,a clown, laughing,7,000301_000350,PT00H00M09S,u\n')
    with pytest.raises(conv.BadAnnotation, match=r'results_2M_val.csv line 2: 7 fields, the header has 6 \(a comma outside'):
        conv.convert('webvid2.5m', str(tmp_path))
    (tmp_path / 'Train_GCC-training.tsv').write_text('a very typical bus station\thttp://a/1.jpg\n'
                                                      'sierra looked stunning in this top\thttp://a/2.jpg\n')
    (tmp_path / 'Validation_GCC-1.1.0-Validation.tsv').write_text('author : a life in photography\thttp://b/1.jpg\n')
    out, sizes = conv.convert('cc3m', str(tmp_path))
    assert out == {'train': {'00000000': ['a very typical bus station'], '00000001': ['sierra looked stunning in this top']},
                   'val': {'00000000': ['author : a life in photography']}}
    assert sizes == {'train': '2 images', 'val': '1 images'}
    (tmp_path / 'Validation_GCC-1.1.0-Validation.tsv').write_text('no url here\n')
    with pytest.raises(conv.BadAnnotation, match=r"Validation_GCC-1.1.0-Validation.tsv line 1: expected a caption, a tab "
                                                 r"and a URL, got 'no url here'"):
        conv.convert('cc3m', str(tmp_path))


# ---- frame extraction at scale

import cv2  # noqa: E402
import make_toy  # noqa: E402
from file_limits import file_size_limit, refused_write  # noqa: E402

frame_tool = make_toy.load_frame_tool()


def write_clip(path, n, seed):
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 8, (48, 32))
    for k in range(n):
        out.write(np.full((32, 48, 3), (seed * 40 + k * 9) % 256, np.uint8))
    out.release()


def clip_dir(d, names):
    os.makedirs(d, exist_ok=True)
    for i, name in enumerate(names):
        write_clip(os.path.join(d, name + '.mp4'), 8 + i, i)
    return d


def test_extract_on_a_full_disk_keeps_what_was_written(tmp_path, monkeypatch):
    """Frames extraction whose output no longer fits (a full disk, a quota): the tool stops with one line naming the
    file, the output written before is intact, and the same command, once there is room, goes on from it."""
    vids = clip_dir(str(tmp_path / 'clips'), ['v0', 'v1'])
    out = tmp_path / 'img_x.pkl'
    assert frame_tool.extract_to(vids, str(out), 3, progress=False)[:2] == (2, 0)
    old = out.read_bytes()
    clip_dir(vids, [f'w{i}' for i in range(6)])  # the pkl is one file: old rows and new are written again
    monkeypatch.setattr(sys, 'argv', ['extract_video-frame.py', '--videos', vids, '--out', str(out), '--sample', '3'])
    with file_size_limit(len(old) + 1000), pytest.raises(SystemExit) as e:
        frame_tool.main()
    assert re.fullmatch(refused_write(out) + re.escape(
        '; the files written before are whole: make room and run the same command again (it goes on with the videos '
        'not yet written)'), str(e.value)), str(e.value)
    assert out.read_bytes() == old and sorted(os.listdir(tmp_path)) == ['clips', 'img_x.extract.json', 'img_x.pkl']
    assert frame_tool.extract_to(vids, str(out), 3, progress=False)[:2] == (6, 2)
    assert sorted(dataset.load_pickle(str(out))) == ['v0', 'v1'] + [f'w{i}' for i in range(6)]


def test_extract_shards_resume_and_failures(tmp_path, monkeypatch):
    vids = clip_dir(str(tmp_path / 'clips'), [f'v{i}' for i in range(7)])
    (tmp_path / 'clips' / 'broken.mp4').write_bytes(b'not a video' * 10)
    (tmp_path / 'clips' / 'empty.mp4').write_bytes(b'')
    want = {f'v{i}': dataset.video_b64(os.path.join(vids, f'v{i}.mp4'), 3)[0] for i in range(7)}
    out = str(tmp_path / 'img_x_train')

    # a crash while the second shard is being written (its rows renamed into place, its index not yet): the
    # first shard is complete, the second has no index, so it does not count as written; the interrupted write
    # removed its temporary file, and the one a kill -9 would have left (here made by hand) goes at the rerun
    real_replace = os.replace
    def crash_on_index_1(src, dst):
        if dst.endswith('_1.lineidx'):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', crash_on_index_1)
    with pytest.raises(frame_tool.Interrupted, match=r'^interrupted: 3 videos written \(0 were there before\)'):
        frame_tool.extract_to(vids, out, 3, layout='tsv', shard_size=3, workers=2, progress=False)
    monkeypatch.undo()
    # (the interrupted shard's videos are not written again as the next shard: they were, twice)
    assert sorted(os.listdir(tmp_path)) == ['clips', 'img_x_train.extract.json', 'img_x_train.failed.json',
                                            'img_x_train_0.lineidx', 'img_x_train_0.tsv', 'img_x_train_1.tsv']
    (tmp_path / 'img_x_train_1.lineidx.tmp4242').write_text('0\n')
    (tmp_path / 'other.tsv.tmp4242').write_text('not ours')

    # the rerun skips the 3 written videos and fills shard 1, then 2; failures are reported, never fatal
    written, before, failed = frame_tool.extract_to(vids, out, 3, layout='tsv', shard_size=3, workers=2, progress=False)
    assert (written, before) == (4, 3)
    assert sorted(os.path.basename(p) for p in failed) == ['broken.mp4', 'empty.mp4']
    assert {os.path.basename(p): r[len(p):len(p) + 15] for p, r in failed.items()} == {
        'broken.mp4': ': not a video (', 'empty.mp4': ': an empty file'}
    report = json.load(open(tmp_path / 'img_x_train.failed.json'))
    assert report['failed'] == failed and report['sample'] == 3
    shards = [convert_layout.read_tsv(f'{out}_{k}.tsv', f'{out}_{k}.lineidx') for k in range(3)]
    assert [list(s) for s in shards] == [['v0', 'v1', 'v2'], ['v3', 'v4', 'v5'], ['v6']]
    assert {v: f for s in shards for v, f in s.items()} == want
    assert dataset.count_parts({'path_data': str(tmp_path)}, 'x') == 3  # readable as pretraining parts
    with pytest.raises(ValueError, match=rf'^{out}_0.tsv holds videos of 3 frames \(e.g. "v0"\), not --sample 4'):
        frame_tool.extract_to(vids, out, 4, layout='tsv', shard_size=3, progress=False)  # the shards checked too
    # nothing left to do: a rerun writes nothing and changes nothing
    before_bytes = [(tmp_path / f'img_x_train_{k}.tsv').read_bytes() for k in range(3)]
    assert frame_tool.extract_to(vids, out, 3, layout='tsv', shard_size=3, progress=False)[:2] == (0, 7)
    assert [(tmp_path / f'img_x_train_{k}.tsv').read_bytes() for k in range(3)] == before_bytes
    # new videos go to a new shard
    clip_dir(vids, ['w0'])
    assert frame_tool.extract_to(vids, out, 3, layout='tsv', shard_size=3, progress=False)[:2] == (1, 7)
    assert list(convert_layout.read_tsv(f'{out}_3.tsv', f'{out}_3.lineidx')) == ['w0']
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f and f.startswith('img_x')]  # the kill's leftover went
    assert os.path.isfile(tmp_path / 'other.tsv.tmp4242')  # (another output's is not this run's to remove)
    # the failures fixed (here: removed), a rerun has none: the earlier list is stale and goes
    assert os.path.isfile(tmp_path / 'img_x_train.failed.json')
    os.remove(tmp_path / 'clips' / 'broken.mp4')
    os.remove(tmp_path / 'clips' / 'empty.mp4')
    assert frame_tool.extract_to(vids, out, 3, layout='tsv', shard_size=3, progress=False) == (0, 8, {})
    assert not os.path.exists(tmp_path / 'img_x_train.failed.json')


def test_extract_ctrl_c_with_workers_and_a_killed_run(tmp_path, capsys):
    """Ctrl-C in a terminal (SIGINT to the whole process group, workers included): each worker printed a
    KeyboardInterrupt traceback and the pkl output lost every video read. Now the workers leave it to the main
    process, which writes what was read and says so in one line; the same command goes on. A run killed mid-way
    (no Ctrl-C) has recorded its --upright before its first output, so a rerun with the other is refused."""
    vids = clip_dir(str(tmp_path / 'clips'), [f'v{i:02d}' for i in range(30)])
    out = str(tmp_path / 'o' / 'img.pkl')
    script = (f'import sys, time\nsys.path[:0] = [{ROOT!r}, {TOOLS!r}]\nimport make_toy\n'
              f'tool = make_toy.load_frame_tool()\nreal = tool.video_b64\n'
              f'def slow(*a, **k):\n    time.sleep(0.2)\n    return real(*a, **k)\n'
              f'tool.video_b64 = slow\nsys.argv = ["tool", "--videos", {vids!r}, "--out", {out!r}, "--sample", "3", '
              f'"--workers", "2"]\ntool.main()\n')
    # (Ctrl-C's default handling: a job started in the background by a shell without job control, a CI runner's,
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = b''
    while not re.search(rb'\| ([2-9]|\d\d)/30 ', err):  # (the bar: two videos read at least)
        chunk = os.read(p.stderr.fileno(), 100)
        assert chunk, err.decode()[-3000:]  # (the tool ended first)
        err += chunk
    os.killpg(p.pid, signal.SIGINT)
    _, rest = p.communicate(timeout=60)
    said = (err + rest).decode().replace('\r', '\n').strip().splitlines()
    n = len(dataset.load_pickle(out))
    assert p.returncode == 1 and 'Traceback' not in '\n'.join(said), said[-20:]
    assert 0 < n < 30 and said[-1] == (f'interrupted: {n} videos written (0 were there before); the same command goes '
                                       f'on with the others')
    assert frame_tool.extract_to(vids, out, 3, progress=False)[:2] == (30 - n, n)
    previous = signal.getsignal(signal.SIGINT)  # (an idle worker, waiting for its next video, printed a traceback)
    try:
        frame_tool.ignore_sigint()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    # killed mid-way (here: an error at the 3rd video), with --upright: the rerun without it is refused
    out2 = str(tmp_path / 'img_k')
    real = frame_tool.video_b64
    calls = []

    def dies(path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise MemoryError
        return real(path, **kw)
    frame_tool.video_b64 = dies
    try:
        with pytest.raises(MemoryError):
            frame_tool.extract_to(vids, out2, 3, layout='tsv', shard_size=1, progress=False, upright=True)
    finally:
        frame_tool.video_b64 = real
    with pytest.raises(ValueError, match=rf'^{out2}_\*.tsv was written with --upright: give the same, or another --out$'):
        frame_tool.extract_to(vids, out2, 3, layout='tsv', shard_size=1, progress=False)
    # a record that is not the tool's is named; without a record (written by an older version) a note says so
    with open(f'{out2}.extract.json', 'w') as f:
        f.write('[1]')
    with pytest.raises(ValueError, match=rf'^{out2}.extract.json: not what this tool writes'):
        frame_tool.extract_to(vids, out2, 3, layout='tsv', shard_size=1, progress=False)
    os.remove(f'{out2}.extract.json')
    capsys.readouterr()
    assert frame_tool.extract_to(vids, out2, 3, layout='tsv', shard_size=10, progress=False)[:2] == (28, 2)
    assert (f'note: {out2}.extract.json is missing (written before the tool recorded it): whether the videos already '
            f'there were turned upright is not checked') in capsys.readouterr().err
    assert not os.path.exists(f'{out2}.extract.json')  # (what the first videos were is unknown: nothing recorded)


def run_extraction(script, timeout=180):
    """Run `script` (the frame tool as `tool`, dataset imported) in a fresh Python -> what it printed, as JSON. A
    worker pool that hangs fails the test at the timeout instead of hanging the suite."""
    head = f'import json, os, signal, sys\nsys.path[:0] = [{ROOT!r}, {TOOLS!r}]\nimport dataset, make_toy\n' \
           'tool = make_toy.load_frame_tool()\n'
    p = subprocess.run([sys.executable, '-c', head + script], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_extract_goes_on_when_a_worker_process_dies(tmp_path):
    """A worker killed while reading a file (FFmpeg crashing on it, the out-of-memory killer) left
    multiprocessing.Pool waiting for ever, the bar stopped, nothing more written. The videos that were in flight are
    read again one at a time: the one that kills its process is listed as failed, every other is stored as the
    serial path stores it."""
    vids = clip_dir(str(tmp_path / 'clips'), [f'v{i:02d}' for i in range(24)])
    os.link(os.path.join(vids, 'v05.mp4'), os.path.join(vids, 'crash.mp4'))
    got = run_extraction(f"""import multiprocessing
multiprocessing.set_start_method('fork')  # (Python 3.14 would not fork by default)
real = dataset.read_video
def read_video(path, *a, **k):  # the workers are forked from here: they read through this
    if os.path.basename(path) == 'crash.mp4':
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *a, **k)
dataset.read_video = read_video
written, before, failed = tool.extract_to({vids!r}, {str(tmp_path / 'img_x')!r}, 3, layout='tsv', shard_size=10,
                                          workers=2, progress=False)
print(json.dumps([written, before, failed]))""")
    crash = os.path.join(vids, 'crash.mp4')
    assert got == [24, 0, {crash: f'{crash}: the process reading it died (FFmpeg crashing on the file, or memory '
                                  f'running out)'}]
    stored = {}
    for k in range(3):
        stored.update(convert_layout.read_tsv(str(tmp_path / f'img_x_{k}.tsv'), str(tmp_path / f'img_x_{k}.lineidx')))
    assert stored == {f'v{i:02d}': dataset.video_b64(os.path.join(vids, f'v{i:02d}.mp4'), 3)[0] for i in range(24)}


def test_extract_workers_started_by_spawn(tmp_path):
    """macOS starts worker processes by spawn (Python 3.14 on Linux by forkserver): a worker imports what it runs by
    its module's name, and the tool's own functions had none when it was imported by path (make_toy, bench_extract,
    here): the pool waited for ever. The frames are those of the serial path."""
    vids = clip_dir(str(tmp_path / 'clips'), ['a', 'b', 'c'])
    want = {v: dataset.video_b64(os.path.join(vids, v + '.mp4'), 3)[0] for v in 'abc'}
    got = run_extraction(f"""import multiprocessing
multiprocessing.set_start_method('spawn')
print(json.dumps(tool.extract_dir({vids!r}, 3, workers=2, progress=False)))""")
    assert got == [want, []]


def test_extract_single_file_layouts_and_cli(tmp_path, capsys, monkeypatch):
    vids = clip_dir(str(tmp_path / 'clips'), ['a', 'b'])
    want = {v: dataset.video_b64(os.path.join(vids, v + '.mp4'), 2)[0] for v in 'ab'}
    # VIOLETv2 layout, one file, read back through the dataset's own layout finder
    code, printed = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/img_y.tsv', '--layout=v2', '--sample=2',
                                          '--workers=1'], capsys, monkeypatch)
    assert code == 0 and f'{tmp_path}/img_y.tsv: 2 videos x 2 frames written, 0 already there; 0 unreadable skipped\n' in printed
    assert not os.path.exists(tmp_path / 'img_y.failed.json')  # nothing failed: no failures list
    assert convert_layout.read_frames(str(tmp_path / 'img_y')) == ('v2', want)
    # a rerun with one more video rewrites the one file with the old rows and the new
    clip_dir(vids, ['c'])
    want['c'] = dataset.video_b64(os.path.join(vids, 'c.mp4'), 2)[0]
    code, printed = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/img_y', '--layout=v2', '--sample=2',
                                          '--workers=1'], capsys, monkeypatch)
    assert code == 0 and '1 videos x 2 frames written, 2 already there' in printed
    assert convert_layout.read_frames(str(tmp_path / 'img_y')) == ('v2', want)
    # a rerun with another --sample would mix frame counts in one set
    code, _ = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/img_y', '--layout=v2', '--sample=3',
                                    '--workers=1'], capsys, monkeypatch)
    assert code == (f'{tmp_path}/img_y.tsv holds videos of 2 frames (e.g. "a"), not --sample 3: give the --sample it was '
                    f'written with, or another --out')
    assert convert_layout.read_frames(str(tmp_path / 'img_y')) == ('v2', want)
    # other extensions (--ext), pkl output, and the errors
    os.rename(os.path.join(vids, 'c.mp4'), os.path.join(vids, 'c.avi'))
    code, _ = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/z.pkl', '--sample=2', '--ext=mp4,avi',
                                    '--workers=1'], capsys, monkeypatch)
    assert code == 0 and dataset.load_pickle(str(tmp_path / 'z.pkl')) == want
    code, _ = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/z.pkl', '--sample=2', '--shard_size=2'],
                  capsys, monkeypatch)
    assert code == '--shard_size needs --layout tsv or v2 (a pkl is one file)'
    # counts checked when parsed (--sample 0 failed after the start; --shard_size -3 wrote one shard of everything)
    for bad, said in ((['--sample=0'], 'argument --sample: must be >= 1, got 0'),
                      (['--sample=2', '--shard_size=-3', '--layout=tsv'], 'argument --shard_size: must be >= 0, got -3'),
                      (['--sample=two'], "argument --sample: invalid int value: 'two'")):
        monkeypatch.setattr(sys, 'argv', ['tool', f'--videos={vids}', f'--out={tmp_path}/n/q', *bad])
        with pytest.raises(SystemExit) as e:
            frame_tool.main()
        assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(said)
    assert not os.path.exists(tmp_path / 'n')
    # --out names what no run reads: a folder (folder.pkl was written), the other layout's extension (f.tsv.pkl,
    # f.pkl.tsv); a file where its folder should be was a traceback; a run that reads no video writes nothing
    # (it left an empty {} pkl)
    (tmp_path / 'afile').write_text('')
    for out, layout, said in (
            (tmp_path, 'pkl', f'--out {tmp_path} is a folder: name the output file in it (e.g. {tmp_path}/img_mydata)'),
            (f'{tmp_path}/f.tsv', 'pkl', f'--out {tmp_path}/f.tsv: a .tsv name for --layout pkl, which writes a .pkl (or '
                                         f'give --layout tsv / v2)'),
            (f'{tmp_path}/f.pkl', 'v2', f'--out {tmp_path}/f.pkl: a .pkl name for --layout v2, which writes a .tsv and '
                                        f'its index (or give --layout pkl)'),
            (f'{tmp_path}/afile/x.pkl', 'pkl', f'--out {tmp_path}/afile/x.pkl: cannot make its folder {tmp_path}/afile: '
                                               f'File exists'),
            (f'{tmp_path}/none', 'v2', f'no video could be read in {vids}')):  # (99 frames: only v2 stores > 6)
        code, _ = cli(frame_tool.main, [f'--videos={vids}', f'--out={out}', f'--layout={layout}', '--workers=1',
                                        '--sample=99' if 'none' in str(out) else '--sample=2'], capsys, monkeypatch)
        assert code == said
    assert sorted(os.listdir(tmp_path)) == ['afile', 'clips', 'img_y.extract.json', 'img_y.id2lineidx.pkl', 'img_y.tsv',
                                            'none.failed.json', 'z.extract.json', 'z.pkl']
    # an --out folder that does not exist yet is made first (the run decoded every video, then crashed writing)
    code, _ = cli(frame_tool.main, [f'--videos={vids}', f'--out={tmp_path}/new/dir/z.pkl', '--sample=2', '--ext=mp4,avi',
                                    '--workers=1'], capsys, monkeypatch)
    assert code == 0 and dataset.load_pickle(str(tmp_path / 'new' / 'dir' / 'z.pkl')) == want


# ---- the toy corpus in VIOLETv2's layout trains a downstream epoch

def test_toy_v2_layout_trains_one_epoch(tmp_path):
    toy = str(tmp_path / 'toy')
    make_toy.make_toy(toy, seed=0, n_videos=4, n_val=4, n_images=4, n_down=16, n_down_eval=8, workers=2, frame_layout='v2')
    assert not os.path.exists(f'{toy}/img_toy.pkl')
    layout, frames = convert_layout.read_frames(f'{toy}/img_toy')
    assert layout == 'v2' and len(frames) == 32 and {len(f) for f in frames.values()} == {make_toy.V2_STORED}
    def qaoe(*argv):
        r = subprocess.run([sys.executable, 'main_qaoe.py', *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert r.returncode == 0, r.stderr[-3000:]
    common = ['_data/toy/args_toy-qaoe.json', '--set', f'path_data={toy}', 'size_frame=5', 'size_epoch=1',
              'size_batch=8', 'num_workers=2']
    out, stopped = str(tmp_path / 'run'), str(tmp_path / 'stopped')
    qaoe(*common, f'path_output={out}')
    log = agent.read_run_log(out)
    assert len(log['ls_tr']) == 1 and all(0 <= log[k][0] <= 1 for k in ('ac_vl', 'ac_ts'))
    # stopped after its first step, then resumed: the same weights. Training draws which stored frames it uses; they
    # came from the DataLoader workers' random state, which resume.pt does not hold (another draw from the stop on)
    qaoe(*common, f'path_output={stopped}', 'stop_after_steps=1')
    qaoe('--resume', stopped)
    a, b = (torch.load(f'{d}/ckpt_violet_toy-qaoe_1.pt', weights_only=True) for d in (out, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_read_video_reads_gifs(tmp_path):
    """TGIF's videos are GIFs: read by the same seek path (their frames are all known here)."""
    frames = [Image.fromarray(np.full((32, 48, 3), k * 20, np.uint8)) for k in range(10)]
    frames[0].save(tmp_path / 'g.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    got = dataset.read_video(str(tmp_path / 'g.gif'), 4)
    assert [int(round(f.mean() / 20)) for f in got] == [2, 4, 6, 8] == dataset.sample_inside(10, 4)


def test_extract_images_one_frame_each(tmp_path):
    """CC3M is images: --ext jpg,png --sample 1. A JPEG is stored as its own bytes (no second lossy encoding), a PNG
    encoded as frames are; a file that does not decode is listed, not stored. A photo given to predict.py (read_video)
    is decoded as training decodes its stored frame (before, FFmpeg decoded it: other values than training saw)."""
    rng = np.random.default_rng(0)
    photos = tmp_path / 'photos'
    photos.mkdir()
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(photos / 'street.jpg', quality=90)
    Image.fromarray(np.kron(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))).save(
        photos / 'chart.png')
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).convert('CMYK').save(photos / 'print.jpeg')
    (photos / 'cut.jpg').write_bytes((photos / 'street.jpg').read_bytes()[:200])
    written, _, failed = frame_tool.extract_to(str(photos), str(tmp_path / 'img_cc3m_train_0'), 1, layout='tsv',
                                                exts=('jpg', 'jpeg', 'png'), progress=False)
    assert written == 3 and list(failed) == [str(photos / 'cut.jpg')]
    assert failed[str(photos / 'cut.jpg')].startswith(f'{photos}/cut.jpg: not an image (')
    stored = convert_layout.read_frames(str(tmp_path / 'img_cc3m_train_0'))[1]
    assert sorted(stored) == ['chart', 'print', 'street'] and all(len(f) == 1 for f in stored.values())
    for name in ('street.jpg', 'print.jpeg'):
        assert base64.b64decode(stored[name.split('.')[0]][0]) == (photos / name).read_bytes()
        seen_by_training = dataset.b64_to_img(stored[name.split('.')[0]][0], 64)
        seen_by_predict = dataset.pad_resize(torch.from_numpy(dataset.read_video(str(photos / name), 1)[0]).permute(2, 0, 1), 64)
        assert torch.equal(seen_by_training, seen_by_predict), name
    chart = dataset.b64_to_img(stored['chart'][0], 40)  # PIL's JPEG of the PNG: close to it, not equal
    png = dataset.pad_resize(torch.from_numpy(np.array(Image.open(photos / 'chart.png'))).permute(2, 0, 1), 40)
    assert 0 < (chart - png).abs().mean() < 0.02
    with pytest.raises(dataset.BadVideo, match=rf'^{photos}/street.jpg: 1 frame \(an image\), fewer than the 5 asked for$'):
        dataset.read_video(str(photos / 'street.jpg'), 5)


# ---- a researcher's own clips, the steps of README's "Your own videos, end to end"

def test_own_videos_end_to_end(tmp_path, capsys, monkeypatch):
    """Clips of every kind a folder holds (mp4, an odd-sized avi, a portrait clip, a 2-frame clip, a corrupt and an
    empty file) -> frames -> captions by hand -> one toy epoch -> eval_retrieval -> predict.py; each bad clip named."""
    import cv2
    import agent, eval_retrieval, main_retrieval, predict
    vids = tmp_path / 'my_videos'
    vids.mkdir()
    for name, size, n, fourcc in [('red.mp4', (48, 32), 10, 'mp4v'), ('blue.mp4', (48, 32), 12, 'mp4v'),
                                  ('tall.mp4', (32, 48), 10, 'mp4v'), ('odd.avi', (45, 31), 9, 'MJPG'),
                                  ('two.mp4', (48, 32), 2, 'mp4v')]:
        out = cv2.VideoWriter(str(vids / name), cv2.VideoWriter_fourcc(*fourcc), 8, size)
        for k in range(n):
            out.write(np.full((size[1], size[0], 3), (len(name) * 40 + k * 9) % 256, np.uint8))
        out.release()
    (vids / 'corrupt.mp4').write_bytes((vids / 'red.mp4').read_bytes()[:300])
    (vids / 'empty.mp4').write_bytes(b'')
    data = tmp_path / 'mydata'
    code, printed = cli(frame_tool.main, ['--videos', str(vids), '--ext', 'mp4,avi', '--sample', '5', '--out',
                                          str(data / 'img_mine.pkl'), '--workers', '1'], capsys, monkeypatch)
    assert code == 0 and '4 videos x 5 frames written, 0 already there; 3 unreadable skipped' in printed
    failed = json.load(open(data / 'img_mine.failed.json'))['failed']
    assert {os.path.basename(p): r.split(': ', 1)[1][:14] for p, r in failed.items()} == {
        'corrupt.mp4': 'an MP4 cut sho', 'empty.mp4': 'an empty file ', 'two.mp4': '2 frames, fewe'}
    items = [dict(video=v, caption=f'a {v} clip') for v in ('red', 'blue', 'tall', 'odd')]
    json.dump(dict(train=items + [dict(video='two', caption='a short clip')], val=items, test=items),
              open(data / 'txt_mine-retrieval.json', 'w'))
    config = os.path.join(ROOT, '_data', 'toy', 'args_toy-retrieval.json')
    sets = ['--set', f'path_data={data}', 'dataset=mine', 'task=mine-retrieval', 'size_epoch=1', 'size_batch=4',
            f'path_output={tmp_path / "run"}']
    with pytest.raises(SystemExit, match=rf'txt_mine-retrieval.json\["train"\]\[4\]: no video "two" in {data}/img_mine.pkl '
                                         rf'\(its extraction failed, {data}/img_mine.failed.json: {vids}/two.mp4: 2 frames, '
                                         r'fewer than the 5 asked for\)'):
        agent.main(main_retrieval.Retrieval, config, [config] + sets)
    assert not os.path.exists(tmp_path / 'run')  # stopped before the first step
    json.dump(dict(train=items, val=items, test=items), open(data / 'txt_mine-retrieval.json', 'w'))
    agent.main(main_retrieval.Retrieval, config, [config] + sets)
    ckpt = str(tmp_path / 'run' / 'ckpt_violet_mine-retrieval_1.pt')
    code, printed = cli(eval_retrieval.main, [str(tmp_path / 'run' / 'args.json'), '--ckpt', ckpt, '--out',
                                              str(tmp_path / 'eval')], capsys, monkeypatch)
    assert code == 0 and 'test t2v: R@1' in printed
    res = predict.main(['retrieval', '--ckpt', ckpt, '--videos', str(vids), '--text', 'a red clip', '--device', 'cpu'])
    assert sorted(os.path.basename(r['video']) for r in res['results'][0]['ranking']) == ['blue.mp4', 'odd.avi', 'red.mp4', 'tall.mp4']
    assert sorted(os.path.basename(s['video']) for s in res['skipped']) == ['corrupt.mp4', 'empty.mp4', 'two.mp4']


def test_tool_arguments_that_would_write_nothing_usable(tmp_path, capsys, monkeypatch):
    """Each of these exited 0 with degenerate output or ended in a traceback: make_toy with no videos (empty parts)
    or a size_img training refuses; extract_tsv on a pkl that is not frames; plot_curves to a format matplotlib lacks
    (after reading every run); predict.py --top 0 (no answer shown); eval_retrieval.py --size_pair -1."""
    import eval_retrieval
    import extract_tsv
    import plot_curves
    import predict
    for main, argv, said in (
            (make_toy.main, ['--out', str(tmp_path / 't'), '--n_videos', '0'], 'argument --n_videos: must be >= 1, got 0'),
            (make_toy.main, ['--out', str(tmp_path / 't'), '--size_img', '63'], 'argument --size_img: invalid choice: 63'),
            (plot_curves.main, [str(tmp_path), '--out', str(tmp_path / 'c.txt')], None),
            (lambda: predict.main(sys.argv[1:]), ['retrieval', '--ckpt', 'x.pt', '--top', '0'],
             'argument --top: must be >= 1, got 0'),
            (eval_retrieval.main, ['--size_pair', '-1'], 'argument --size_pair: must be >= 0, got -1')):
        monkeypatch.setattr(sys, 'argv', ['tool'] + argv)
        with pytest.raises(SystemExit) as e:
            main()
        code, err = e.value.code, capsys.readouterr().err
        if said is None:
            assert code.startswith(f'--out {tmp_path}/c.txt: an image file is one of ') and '.png, ' in code
        else:
            assert code == 2 and said in err, (code, err)
    assert not os.path.exists(tmp_path / 't')
    for obj, said in (([1], 'holds a list, not frames {video id: [base64 JPEG, ...]}'),
                      ({'v': 5}, 'video "v" holds int 5, not a list of base64 str'),
                      ({3: ['x']}, 'video id 3 is a int, not a str')):
        with open(tmp_path / 'f.pkl', 'wb') as f:
            pickle.dump(obj, f)
        for path in ('f', 'f.pkl'):  # (the file's own name: it looked for f.pkl.pkl)
            code, _ = cli(extract_tsv.main, ['--path', str(tmp_path / path)], capsys, monkeypatch)
            assert code == f'{tmp_path}/f.pkl: {said}'
    assert not os.path.exists(tmp_path / 'f.tsv')
