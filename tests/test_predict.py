"""predict.py and api.py on tiny self-made videos (OpenCV VideoWriter) and the toy model: every mode, the same
numbers as the extraction tool + dataset reader, bad inputs, the feature cache, list input, safetensors."""
import csv
import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import agent
import api
import dataset
import model as violet
import predict
from file_limits import file_size_limit, refused_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f'{REPO}/_data/bert-tiny'
VOCAB = ['red', 'green', 'blue', 'yellow', 'purple', 'square', 'bar', 'dot', 'left', 'right', 'up', 'down']
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def write_video(path, n, bgr, w=80, h=48):
    """n frames of a coloured bar moving right over a grey background (odd width/height: padding is exercised)."""
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 10, (w, h))
    for i in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[10:30, 4 + 4 * i:20 + 4 * i] = bgr
        out.write(f)
    out.release()


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp('clips')
    lib = d / '_lib'  # the extraction tool reads X/_NAME/*.mp4
    lib.mkdir()
    write_video(str(lib / 'red.mp4'), 12, (0, 0, 230))
    write_video(str(lib / 'blue.mp4'), 14, (230, 80, 0))
    write_video(str(lib / 'green.mp4'), 10, (0, 200, 0))
    bad = d / 'mixed'
    bad.mkdir()
    write_video(str(bad / 'ok.mp4'), 12, (0, 0, 230))
    write_video(str(bad / 'short.mp4'), 3, (0, 200, 0))  # fewer frames than the 5 asked for
    (bad / 'notes.txt').write_text('not a video')
    (bad / 'empty.mp4').write_bytes(b'')
    return d


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A checkpoint of each task (args.json beside it, as a run writes; vocab.json for QA-OE), heads spread so
    that scores differ between inputs."""
    out = {}
    for t in ('pretrain', 'qamc', 'qaoe', 'retrieval'):
        d = tmp_path_factory.mktemp(t)
        cfg = f'{REPO}/_data/toy/args_pretrain.json' if t == 'pretrain' else f'{REPO}/_data/toy/args_toy-{t}.json'
        args = agent.load_args(cfg, [f'txt_backbone={TINY}'])
        torch.manual_seed(0)
        m = violet.MODELS[t](args)
        with torch.no_grad():
            m.fc[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        torch.save(m.state_dict(), d / 'ckpt.pt')
        agent.save_json(args, str(d / 'args.json'))
        if t == 'qaoe':
            agent.save_json(VOCAB, str(d / 'vocab.json'))
        out[t] = str(d / 'ckpt.pt')
    return out


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name.replace('-', '_'), os.path.join(REPO, '_tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def png_b64(rgb):
    import base64
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='PNG')
    return base64.b64encode(buf.getvalue()).decode('ascii')


def dataset_scores(clips, ckpt, lossless, monkeypatch):
    """The training route: _tools/extract_video-frame.py -> img_lib.pkl -> Dataset_Retrieval -> the model."""
    tool = load_tool('extract_video-frame')
    if lossless:  # the same frames without the JPEG round-trip
        monkeypatch.setattr(dataset, 'frame_b64', png_b64)
    data = clips / ('png' if lossless else 'jpeg')
    data.mkdir(exist_ok=True)
    pkl, bad = tool.extract_dir(str(clips / '_lib'), 5, str(data / 'img_lib.pkl'), workers=1, progress=False)
    assert not bad
    caps = ['a red bar moves right', 'a blue dot moves up']
    items = [dict(video=v, caption=c) for v in sorted(pkl) for c in caps]
    json.dump({'val': items}, open(data / 'txt_lib.json', 'w'))
    args = json.load(open(os.path.join(os.path.dirname(ckpt), 'args.json')))
    ds = dataset.Dataset_Retrieval({**args, 'path_data': str(data), 'dataset': 'lib', 'task': 'lib'}, 'val')
    m = violet.VIOLET_Retrieval(args).eval()
    m.load_ckpt(ckpt, need='all')
    out = {}
    with torch.no_grad():
        for i, it in enumerate(items):
            img, txt, mask = ds[i]
            f = m.go_feat(img[None], torch.as_tensor(txt)[None], torch.as_tensor(mask)[None])
            out[it['video'], it['caption']] = float(m.score(*f))
    return out, caps, sorted(pkl)


def test_predict_equals_extraction_tool_and_dataset(clips, ckpts, monkeypatch, capsys):
    """Same frames (dataset.read_video), same pipeline (dataset.pad_resize): the same score to 1e-4 when the
    tool stores the frames losslessly; the JPEG round-trip of the real files adds a small measured difference."""
    m = api.load(ckpts['retrieval'])
    for lossless in (True, False):
        ref, caps, vids = dataset_scores(clips, ckpts['retrieval'], lossless, monkeypatch)
        got = m.score([str(clips / '_lib' / f'{v}.mp4') for v in vids], caps)
        diff = max(abs(got[i, k] - ref[v, c]) for i, v in enumerate(vids) for k, c in enumerate(caps))
        spread = np.ptp(got)
        if lossless:
            assert diff < 1e-4
        else:
            with capsys.disabled():
                print(f'\nJPEG round-trip: max |score difference| {diff:.2e} (scores span {spread:.2e})')
            assert 0 < diff < 0.1 * spread  # the JPEG route differs, a little
        monkeypatch.undo()


def test_api_video_forms_and_checks(clips, ckpts):
    m = api.load(ckpts['retrieval'])
    path = str(clips / '_lib' / 'red.mp4')
    rgb = dataset.read_video(path, 5)
    f_path = m.embed_video(path)[0]
    assert torch.equal(m.embed_video(np.stack(rgb))[0], f_path)
    assert torch.equal(m.embed_video([Image.fromarray(x) for x in rgb])[0], f_path)
    # 16-bit grey PIL images as their 8-bit values (convert('RGB') made them white)
    grey = [np.rint(x.mean(2)).astype(np.uint8) for x in rgb]
    f_grey = m.embed_video(np.stack([np.repeat(g[:, :, None], 3, axis=2) for g in grey]))[0]
    assert torch.equal(m.embed_video([Image.fromarray(g.astype(np.uint16) * 257) for g in grey])[0], f_grey)
    assert f_path.shape == (5 * (1 + 2 * 2), m.model.hidden_size)
    with pytest.raises(ValueError, match=r'a video array must be uint8 \[T, H, W, 3\], got float32 \[5, 48, 80, 3\]'):
        m.embed_video(np.stack(rgb).astype(np.float32))
    with pytest.raises(dataset.BadVideo, match='short.mp4: 3 frames, fewer than the 5 asked for'):
        m.embed_video(str(clips / 'mixed' / 'short.mp4'))
    with pytest.raises(ValueError, match='a QA-OE model answers from its vocabulary'):
        api.load(ckpts['qaoe']).answer(path, 'what?', options=['a', 'b'])
    # no video or no text: an empty score matrix of that shape (it failed inside torch.stack)
    assert m.score([], ['a', 'b']).shape == (0, 2) and m.score([path], []).shape == (1, 0)


def run_predict(capsys, *argv):
    res = predict.main(list(argv))
    return res, capsys.readouterr().out


def test_retrieval_mode_ranks_folder_and_cache(clips, ckpts, capsys, tmp_path, monkeypatch):
    out = tmp_path / 'r.json'
    cache = tmp_path / 'cache'
    texts = ['a red bar moves right', 'a blue bar moves right']
    res, printed = run_predict(capsys, 'retrieval', '--ckpt', ckpts['retrieval'], '--videos', str(clips / '_lib'),
                               '--text', *texts, '--out', str(out), '--cache', str(cache))
    assert json.load(open(out)) == json.loads(json.dumps(res))
    m = api.load(ckpts['retrieval'])
    vids = [str(clips / '_lib' / f) for f in ('blue.mp4', 'green.mp4', 'red.mp4')]
    s = m.score(vids, texts)
    for k, r in enumerate(res['results']):
        assert [x['video'] for x in r['ranking']] == [vids[i] for i in np.argsort(-s[:, k], kind='stable')]
        assert np.allclose([x['score'] for x in r['ranking']], np.sort(s[:, k])[::-1], atol=1e-5)
    assert f'"{texts[0]}"' in printed and 'pairs' in printed and res['pairs_per_s'] > 0
    assert len(os.listdir(cache)) == 3
    # a new text reuses the cached features: the video encoder is never run again
    monkeypatch.setattr(violet.EncImg, 'forward', lambda *a: pytest.fail('video encoder ran despite the cache'))
    res2, _ = run_predict(capsys, 'retrieval', '--ckpt', ckpts['retrieval'], '--videos', str(clips / '_lib'),
                          '--text', texts[1], '--cache', str(cache))
    got, ref = res2['results'][0]['ranking'], res['results'][1]['ranking']
    assert [x['video'] for x in got] == [x['video'] for x in ref]
    assert np.allclose([x['score'] for x in got], [x['score'] for x in ref], atol=1e-5)


def test_table_names_clips_of_one_name_by_path():
    """The table showed file names alone: clips of one name in different folders were rows alike."""
    ranking = [dict(video=v, score=s) for v, s in (('a/red.mp4', 2.0), ('b/red.mp4', 1.0), ('b/blue.mp4', 0.5))]
    assert predict.table('retrieval', [dict(text='red', ranking=ranking)], 3).splitlines()[1:] == [
        '     1     2.0000  a/red.mp4', '     2     1.0000  b/red.mp4', '     3     0.5000  b/blue.mp4']
    assert predict.table('retrieval', [dict(text='red', ranking=ranking[1:])], 3).splitlines()[1:] == [
        '     1     1.0000  red.mp4', '     2     0.5000  blue.mp4']


def test_full_disk_named_for_cache_and_results(clips, ckpts, capsys, tmp_path):
    """A cache file or the results file that cannot be written (a full disk; here the OS's file size limit): one line
    naming it, no half file left; the results are printed before their file is written."""
    cache, out = tmp_path / 'cache', tmp_path / 'r.json'
    args = ['retrieval', '--ckpt', ckpts['retrieval'], '--videos', str(clips / '_lib'), '--text', 'a red bar']
    with file_size_limit(100), pytest.raises(SystemExit) as e:
        predict.main(args + ['--cache', str(cache)])
    assert re.fullmatch(rf'predict: could not write {re.escape(str(cache))}/[0-9a-f]{{32}}\.safetensors: File too large '
                        rf'\(after \d+(\.\d)? (bytes|KB) of it; [\d.]+ (MB|GB) free on its disk\); make room, or run '
                        rf'without --cache', str(e.value)), str(e.value)
    assert os.listdir(cache) == []
    capsys.readouterr()
    with file_size_limit(100), pytest.raises(SystemExit) as e:
        predict.main(args + ['--out', str(out)])
    assert re.fullmatch('predict: ' + refused_write(out) + re.escape(' (the results are printed above)'), str(e.value))
    assert '"a red bar"' in capsys.readouterr().out and os.listdir(tmp_path) == ['cache']


def test_folder_lists_links_and_pipes_it_cannot_read(clips, ckpts, capsys, tmp_path):
    """A broken link and a named pipe in a folder were dropped without a word (not in 'skipped', exit 0), and the
    extraction tool called the pipe 'no such file'; both are skipped and listed with their reason now (a pipe is
    never opened: reading it would wait for a writer)."""
    folder = tmp_path / 'mine'
    folder.mkdir()
    shutil.copy(clips / 'mixed' / 'ok.mp4', folder / 'ok.mp4')
    os.symlink(tmp_path / 'gone.mp4', folder / 'broken.mp4')
    os.mkfifo(folder / 'pipe.mp4')
    res, printed = run_predict(capsys, 'pretrain', '--ckpt', ckpts['pretrain'], '--video', str(folder), '--text', 'x',
                               '--frames', '5')
    assert [r['video'] for r in res['results']] == [str(folder / 'ok.mp4')]
    assert {s['video']: s['error'] for s in res['skipped']} == {
        str(folder / 'broken.mp4'): f'{folder}/broken.mp4: a broken link (to {tmp_path}/gone.mp4)',
        str(folder / 'pipe.mp4'): f'{folder}/pipe.mp4: not a regular file (a named pipe, a socket or a device)'}


def test_folder_skips_bad_files_named_file_stops(clips, ckpts, capsys):
    res, printed = run_predict(capsys, 'pretrain', '--ckpt', ckpts['pretrain'], '--video', str(clips / 'mixed'),
                               '--text', 'a red bar moves right', '--frames', '5')
    assert [r['video'] for r in res['results']] == [str(clips / 'mixed' / 'ok.mp4')]
    skipped = {os.path.basename(s['video']): s['error'] for s in res['skipped']}
    assert set(skipped) == {'empty.mp4', 'notes.txt', 'short.mp4'}
    assert skipped['short.mp4'] == f'{clips}/mixed/short.mp4: 3 frames, fewer than the 5 asked for'
    assert skipped['notes.txt'].startswith(f'{clips}/mixed/notes.txt: not a video')
    assert 'skipped 3 unreadable' in printed
    m = api.load(ckpts['pretrain'], n_frames=5)
    assert res['results'][0]['score'] == pytest.approx(float(m.score([str(clips / 'mixed' / 'ok.mp4')],
                                                                      ['a red bar moves right'])[0, 0]), abs=1e-5)
    for name in ('notes.txt', 'short.mp4'):
        with pytest.raises(SystemExit) as e:
            predict.main(['pretrain', '--ckpt', ckpts['pretrain'], '--video', str(clips / 'mixed' / name), '--text', 'x',
                          '--frames', '5'])
        assert str(e.value).startswith(f'predict: {clips}/mixed/{name}: ')
    with pytest.raises(SystemExit) as e:
        predict.main(['pretrain', '--ckpt', ckpts['pretrain'], '--video', str(clips / 'nope.mp4'), '--text', 'x'])
    assert str(e.value) == f'predict: {clips}/nope.mp4: no such file'


def test_qamc_mode_and_zero_shot(clips, ckpts, capsys):
    opts = ['a red bar moves right', 'a blue dot moves up', 'a green square moves left']
    video = str(clips / '_lib' / 'red.mp4')
    for kind in ('qamc', 'pretrain'):  # pretrain: zero-shot with the VTM head
        res, printed = run_predict(capsys, 'qamc', '--ckpt', ckpts[kind], '--video', video, '--question',
                                   'what does the video show?', '--options', *opts, '--frames', '5')
        r = res['results'][0]
        # independently: the model's own forward on the same frames
        m = api.load(ckpts[kind], n_frames=5)
        img = m.frames(video)[None]
        txt, mask = zip(*[dataset.tokenize(m.tokzr, f'what does the video show? {o}', m.args['size_txt']) for o in opts])
        txt, mask = torch.as_tensor(np.stack(txt)), torch.as_tensor(np.stack(mask))
        with torch.no_grad():
            if kind == 'qamc':
                ref = m.model(img, txt[None], mask[None])[0]
            else:
                f_img, m_img, f_txt, m_txt = m.model.go_feat(img.expand(3, -1, -1, -1, -1), txt, mask)
                ref = m.model.score(f_img, m_img, f_txt, m_txt)
        assert np.allclose([o['score'] for o in r['options']], ref.numpy(), atol=1e-5)
        t = 1.0 if kind == 'qamc' else 0.05
        assert np.allclose([o['prob'] for o in r['options']], torch.softmax(ref.double() / t, 0).numpy(), atol=1e-6)
        assert r['answer'] == opts[int(ref.argmax())] and f'* {r["prob"]:6.3f}  {r["answer"]}' in printed


def test_qaoe_mode_answers_in_words(clips, ckpts, capsys, tmp_path):
    video = str(clips / '_lib' / 'blue.mp4')
    res, printed = run_predict(capsys, 'qaoe', '--ckpt', ckpts['qaoe'], '--video', video, '--question',
                               'what color is the bar?', '--top', '3')
    r = res['results'][0]
    m = api.load(ckpts['qaoe'])
    txt, mask = dataset.tokenize(m.tokzr, 'what color is the bar?', m.args['size_txt'])
    with torch.no_grad():
        p = torch.softmax(m.model(m.frames(video)[None], torch.as_tensor(txt)[None], torch.as_tensor(mask)[None])[0], 0)
    order = p.argsort(descending=True)[:3].tolist()
    assert [a['answer'] for a in r['top']] == [VOCAB[i] for i in order] and r['answer'] == VOCAB[order[0]]
    assert np.allclose([a['prob'] for a in r['top']], p[order].numpy(), atol=1e-6)
    assert f'{r["top"][0]["prob"]:6.3f}  {r["answer"]}' in printed
    # an official-style checkpoint has no vocab.json: the task's txt_*.json supplies the words
    bare = tmp_path / 'bare'
    bare.mkdir()
    torch.save(torch.load(ckpts['qaoe'], weights_only=True), bare / 'ckpt.pt')
    cfg = json.load(open(os.path.join(os.path.dirname(ckpts['qaoe']), 'args.json')))
    json.dump({**cfg, 'size_vocab': 0}, open(tmp_path / 'cfg.json', 'w'))
    with pytest.raises(SystemExit, match=r"needs its answer vocabulary .*give the task's txt_<task>.json \(--vocab\)"):
        predict.main(['qaoe', '--ckpt', str(bare / 'ckpt.pt'), '--config', str(tmp_path / 'cfg.json'),
                      '--video', video, '--question', 'what color is the bar?'])
    json.dump(cfg, open(tmp_path / 'cfg_n.json', 'w'))  # size_vocab known: the model loads, its words are missing
    assert cfg['size_vocab'] == len(VOCAB)  # (a traceback from api, after the videos were decoded)
    with pytest.raises(SystemExit, match=r'^predict: \S+ckpt.pt has no answer vocabulary \(no vocab.json beside it, '
                                         r'none stored\): give --vocab txt_<task>.json'):
        predict.main(['qaoe', '--ckpt', str(bare / 'ckpt.pt'), '--config', str(tmp_path / 'cfg_n.json'),
                      '--video', video, '--question', 'what color is the bar?'])
    json.dump({'vocab': VOCAB, 'train': []}, open(tmp_path / 'txt_x.json', 'w'))
    res2, _ = run_predict(capsys, 'qaoe', '--ckpt', str(bare / 'ckpt.pt'), '--config', str(tmp_path / 'cfg.json'),
                          '--vocab', str(tmp_path / 'txt_x.json'), '--video', video, '--question', 'what color is the bar?',
                          '--top', '3')
    assert res2['results'][0]['top'] == r['top']
    with pytest.raises(SystemExit, match='is a qaoe model; mode retrieval needs a pretrain, retrieval or qamc one'):
        predict.main(['retrieval', '--ckpt', ckpts['qaoe'], '--video', video, '--text', 'x'])
    # pretrain mode reports the VTM head's score: a fine-tuned head's scores were given under that name
    for kind in ('retrieval', 'qamc'):
        with pytest.raises(SystemExit, match=f"is a {kind} model; mode pretrain scores with a pretraining checkpoint's "
                                             f"VTM head: use mode {kind}$"):
            predict.main(['pretrain', '--ckpt', ckpts[kind], '--video', video, '--text', 'x'])


def test_list_input_csv_and_json_and_safetensors(clips, ckpts, capsys, tmp_path):
    rows = [dict(video='_lib/red.mp4', question='what does the video show?', options='a red bar|a blue dot'),
            dict(video='mixed/notes.txt', question='what does the video show?', options='a red bar|a blue dot'),
            dict(video='_lib/blue.mp4', question='what does the video show?', options='a red bar|a blue dot')]
    with open(clips / 'rows.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    json.dump([dict(r, options=r['options'].split('|')) for r in rows], open(clips / 'rows.json', 'w'))
    res = {}
    for ext in ('csv', 'json'):
        res[ext], _ = run_predict(capsys, 'qamc', '--ckpt', ckpts['qamc'], '--list', str(clips / f'rows.{ext}'))
        assert [os.path.basename(r['video']) for r in res[ext]['results']] == ['red.mp4', 'blue.mp4']
        assert [os.path.basename(s['video']) for s in res[ext]['skipped']] == ['notes.txt']
    assert res['csv']['results'] == res['json']['results']
    # the same checkpoint as safetensors + JSON (_tools/convert_ckpt.py) answers the same
    p = subprocess.run([sys.executable, '_tools/convert_ckpt.py', ckpts['qamc'], '--out', str(tmp_path / 'qamc.safetensors')],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    import hashlib
    digest = hashlib.sha256(open(tmp_path / 'qamc.safetensors', 'rb').read()).hexdigest()
    assert f'qamc.safetensors  sha256 {digest}' in p.stdout
    meta = json.load(open(tmp_path / 'qamc.json'))
    assert meta['sha256'] == digest and meta['config']['type'] == 'qamc'
    res_st, _ = run_predict(capsys, 'qamc', '--ckpt', str(tmp_path / 'qamc.safetensors'), '--list', str(clips / 'rows.csv'))
    assert res_st['results'] == res['csv']['results']


def test_list_row_without_text_is_refused(tmp_path, capsys):
    """A CSV whose header misspelt 'question' used to answer an empty question for every row, silently."""
    (tmp_path / 'rows.csv').write_text('video,questoin\nv.mp4,what is it?\n')
    with pytest.raises(SystemExit, match=rf'^{tmp_path}/rows.csv: row 1 has no "text" or "question" \(its keys: video, questoin\)$'):
        predict.read_rows(str(tmp_path / 'rows.csv'))
    json.dump([dict(video='v.mp4', text='a dog'), dict(video='w.mp4', text='')], open(tmp_path / 'rows.json', 'w'))
    with pytest.raises(SystemExit, match=r'rows.json: row 2 has no "text" or "question" \(its keys: video, text\)$'):
        predict.read_rows(str(tmp_path / 'rows.json'))
    # blank texts and options were scored as [CLS] [SEP]
    json.dump([dict(video='v.mp4', text='a dog'), dict(video='w.mp4', text=' \t')], open(tmp_path / 'rows.json', 'w'))
    with pytest.raises(SystemExit, match=r'rows.json: row 2 has no "text" or "question" \(its keys: video, text\)$'):
        predict.read_rows(str(tmp_path / 'rows.json'))
    (tmp_path / 'rows.csv').write_text('video,question,options\nv.mp4,what is it?,a dog|a cat\nv.mp4,what is it?,a dog||a cat\n')
    with pytest.raises(SystemExit, match=r"rows.csv: row 2: option 1 is '': it needs words \(an empty one would be "
                                         r"scored as \[CLS\] \[SEP\] alone\)$"):
        predict.read_rows(str(tmp_path / 'rows.csv'))
    for argv, said in [(['retrieval', '--text', 'a dog', ' '], "text 1 is ' '"),
                       (['qamc', '--question', 'what?', '--options', 'a', ''], "option 1 is ''"),
                       (['qaoe', '--question', '  '], "question 0 is '  '")]:
        with pytest.raises(SystemExit):
            predict.main(argv + ['--ckpt', 'x.pt', '--video', 'v.mp4'])
        assert f'error: {said}: it needs words' in capsys.readouterr().err


def test_list_files_as_people_save_them(tmp_path):
    """A list saved by Excel ("CSV UTF-8": a BOM first) was refused as 'row 1 has no "video"' (the first column read
    as '\\ufeffvideo'); a missing list, a JSON one with a syntax error and one in Windows-1252 stopped with a traceback."""
    rows = 'video,question,option_0,option_1\r\nv.mp4,qu\u2019est-ce que c\u2019est ?,un caf\u00e9,une cr\u00eape\r\n'
    (tmp_path / 'rows.csv').write_text(rows, encoding='utf-8-sig', newline='')
    got = predict.read_rows(str(tmp_path / 'rows.csv'))
    assert got == [dict(video=str(tmp_path / 'v.mp4'), text='qu\u2019est-ce que c\u2019est ?',
                        options=['un caf\u00e9', 'une cr\u00eape'])]
    # a column that only starts like an option is not one (int('notes') was a traceback)
    (tmp_path / 'rows.csv').write_text('video,text,option_1,option_0,option_notes\nv.mp4,q,b,a,n\n')
    assert predict.read_rows(str(tmp_path / 'rows.csv'))[0]['options'] == ['a', 'b']
    (tmp_path / 'rows.csv').write_text(rows, encoding='cp1252', newline='')
    with pytest.raises(SystemExit, match=rf'^--list: {tmp_path}/rows.csv: not UTF-8 text \(byte 0x92 at offset 42\): '
                                         r'save it as UTF-8$'):
        predict.read_rows(str(tmp_path / 'rows.csv'))
    with pytest.raises(SystemExit, match=rf'^--list: cannot read {tmp_path}/none.csv: No such file or directory$'):
        predict.read_rows(str(tmp_path / 'none.csv'))
    (tmp_path / 'rows.json').write_text('[{"video": "v.mp4", "text": "a dog"},]')
    with pytest.raises(SystemExit, match=rf'^{tmp_path}/rows.json: not valid JSON \(Expecting value: line 1 column 38'):
        predict.read_rows(str(tmp_path / 'rows.json'))


def test_predict_arguments_named_before_the_work(ckpts, clips, tmp_path, capsys):
    """Each was a traceback (some after every video was scored): --list rows of the wrong types, an upper-case .JSON
    read as CSV, an empty list ('no readable video'), --device foo or cuda without a GPU, --cache on a file, --out
    under a file or on a folder."""
    video = str(clips / '_lib' / 'red.mp4')
    for rows, said in [([{'video': 5, 'question': 'q'}], r'row 1: "video" is a int \(5\), not a str'),
                       ([{'video': 'v.mp4', 'question': ['q']}], r'row 1: "question" is a list .*, not a str'),
                       ([{'video': 'v.mp4', 'question': 'q', 'options': 3}], r'row 1: "options" is a int \(3\), not a list of str'),
                       ([], r'no rows')]:
        (tmp_path / 'L.JSON').write_text(json.dumps(rows))
        with pytest.raises(SystemExit, match=rf'^{tmp_path}/L.JSON: {said}'):
            predict.read_rows(str(tmp_path / 'L.JSON'))
    (tmp_path / 'afile').write_text('x')
    base = ['qaoe', '--ckpt', ckpts['qaoe'], '--video', video, '--question', 'what color?']
    for extra, said in [(['--device', 'foo'], r"predict: device 'foo': not a device name \(cpu, cuda, cuda:1, ...\)"),
                        (['--cache', str(tmp_path / 'afile')], rf'predict: cache {tmp_path}/afile: cannot make the folder: '
                                                                rf'a file is in its way$'),
                        (['--out', str(tmp_path / 'afile' / 'r.json')], rf'predict: --out {tmp_path}/afile/r.json: cannot '
                                                                         rf'make its folder {tmp_path}/afile: a file is in its way$'),
                        (['--out', str(tmp_path)], rf'predict: --out {tmp_path} is a folder: give a file name')]:
        with pytest.raises(SystemExit, match=f'^{said}'):
            predict.main(base + extra)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r'^predict: device cuda: no CUDA GPU here; --device cpu runs on the CPU$'):
            predict.main(base + ['--device', 'cuda'])
    with pytest.raises(SystemExit):  # --options beside an open-ended question were ignored in silence
        predict.main(base + ['--options', 'red', 'blue'])
    assert capsys.readouterr().err.strip().endswith('error: --options are for qamc; qaoe answers from its vocabulary')
    if not torch.backends.mps.is_available():  # (a 20-line traceback at the model's .to('mps'))
        with pytest.raises(SystemExit, match=r'^predict: device mps: no mps device here \(this torch or machine lacks '
                                             r'it\); --device cpu runs on the CPU$'):
            predict.main(base + ['--device', 'mps'])


def test_checkpoint_missing_is_named_before_its_config(tmp_path):
    """A mistyped --ckpt was answered 'no config beside it', as if the file were there."""
    with pytest.raises(FileNotFoundError, match=rf'^checkpoint not found: {tmp_path}/nope.pt$'):
        api.find_config(str(tmp_path / 'nope.pt'))
    torch.save({}, tmp_path / 'bare.pt')
    with pytest.raises(FileNotFoundError, match=rf'^{tmp_path}/bare.pt: no config beside it \(NAME.json or args.json\)'):
        api.find_config(str(tmp_path / 'bare.pt'))
    # a run's folder given for its checkpoint: named as a folder (it was 'checkpoint not found'), in predict.py too
    torch.save({}, tmp_path / 'ckpt_violet_x_1.pt')
    with pytest.raises(ValueError, match=rf"^{tmp_path} is a folder, not a checkpoint file \(the newest in it is "
                                         rf"{tmp_path}/ckpt_violet_x_1.pt\)$"):
        api.find_config(str(tmp_path))


def test_folders_inside_a_folder_are_named(tmp_path, capsys):
    """A folder of class folders gave 'predict: no readable video' without a word of the videos one level down."""
    for d in ('class_a', 'class_b'):
        (tmp_path / 'lib' / d).mkdir(parents=True)
        (tmp_path / 'lib' / d / 'v.mp4').write_bytes(b'x')
    with pytest.raises(SystemExit, match=rf'^predict: {tmp_path}/lib: no files \(only folders\)$'):
        predict.expand([str(tmp_path / 'lib')])
    assert capsys.readouterr().err == (f'predict: {tmp_path}/lib: its folders are not searched (class_a, class_b): name '
                                       f'them to include them\n')
    assert predict.expand([str(tmp_path / 'lib' / 'class_a')]) == [(str(tmp_path / 'lib' / 'class_a' / 'v.mp4'), False)]


def test_api_refuses_blank_texts_and_too_many_frames(ckpts, clips):
    path = str(clips / '_lib' / 'red.mp4')
    with pytest.raises(ValueError, match=r'^frames: 8, but VIOLET takes 1 to 6 per video \(emb_len\)$'):
        api.load(ckpts['retrieval'], n_frames=8)  # it failed in the model's emb_len addition
    with pytest.raises(ValueError, match=r"^text 1 is '': it needs words"):
        api.load(ckpts['retrieval']).score([path], ['a red bar', ''])
    with pytest.raises(ValueError, match=r"^option 0 is ' ': it needs words"):
        api.load(ckpts['qamc']).answer(path, 'what?', options=[' ', 'a red bar'])
    assert api.load(ckpts['qamc']).answer(path, '', options=['a blue bar', 'a red bar'])['answer']  # no question: allowed
    with pytest.raises(ValueError, match=r"^question 0 is '': it needs words"):
        api.load(ckpts['qaoe']).answer(path, '')
    with pytest.raises(ValueError, match=r"^text 0 is '\\u200b\\xad': it needs words"):  # (str.strip kept them: training's rule)
        api.load(ckpts['retrieval']).score([path], ['\u200b\xad'])


def test_api_arguments_that_were_misread(ckpts, clips, tmp_path, capsys):
    """Plausible misuse of the Python API: size_pair=-1 returned uninitialised memory as scores; a str of texts or
    options was scored letter by letter; question None was scored as the text "None"; top=0 and options=[] were
    tracebacks; 7 frames failed inside the model. A cache entry cut short was a safetensors traceback."""
    path = str(clips / '_lib' / 'red.mp4')
    m = api.load(ckpts['retrieval'])
    with pytest.raises(ValueError, match=r'^size_pair must be an int >= 0 \(0: 512 on CUDA, 64 on CPU\), got -1$'):
        m.score([path], ['a red bar'], size_pair=-1)
    with pytest.raises(ValueError, match=r"^texts must be a list of str, got str 'a red bar'$"):
        m.score([path], 'a red bar')
    with pytest.raises(ValueError, match=r"^videos must be a list \(of paths, arrays or frame lists\), got str '/"):
        m.score(path, ['a red bar'])
    with pytest.raises(ValueError, match=r"^texts must be a list of str, got set \{'a red bar'\}$"):
        m.score([path], {'a red bar'})  # (no order: which column is which?)
    # what a Python user passes for a list or an int: numpy arrays and integers, tuples, generators, pathlib paths
    # (refused as not lists and not ints until 2026-11-29)
    want = m.score([path, path], ['a red bar', 'a blue dot'], size_pair=4)
    for videos, texts, size in [(np.array([path, path]), np.array(['a red bar', 'a blue dot']), np.int64(4)),
                                ((pathlib.Path(path),) * 2, (t for t in ('a red bar', 'a blue dot')), 4),
                                (np.stack([np.stack(dataset.read_video(path, 5))] * 2), ['a red bar', 'a blue dot'], 4)]:
        assert np.array_equal(m.score(videos, texts, size_pair=size), want)
    assert np.array_equal(api.load(pathlib.Path(ckpts['retrieval'])).score([path] * 2, ['a red bar', 'a blue dot'], 4), want)
    with pytest.raises(ValueError, match=r'^size_pair must be an int >= 0 \(0: 512 on CUDA, 64 on CPU\), got 2.0$'):
        m.score([path], ['a red bar'], size_pair=2.0)
    rgb = np.stack(dataset.read_video(path, 5))
    with pytest.raises(ValueError, match=r'^a video of 7 frames of \[\[48, 80\]\] pixels: VIOLET takes 1 to 6 frames'):
        m.embed_video(np.concatenate([rgb, rgb[:2]]))
    qamc, qaoe = api.load(ckpts['qamc']), api.load(ckpts['qaoe'])
    for call, said in [(lambda: qamc.answer(path, None, options=['a', 'b']), r'^question must be a str, got NoneType$'),
                       (lambda: qamc.answer(path, 'q', options='ab'), r"^options must be a list of str, got str 'ab'$"),
                       (lambda: qamc.answer(path, 'q', options=[]), r'^options is empty: give the candidate answers$'),
                       (lambda: qaoe.answer(path, 'what?', top=0), r'^top must be an int >= 1, got 0$')]:
        with pytest.raises(ValueError, match=said):
            call()
    assert qaoe.answer(path, 'what?', top=np.int64(2)) == qaoe.answer(path, 'what?', top=2)
    assert qamc.answer(path, 'q', options=np.array(['a', 'b'])) == qamc.answer(path, 'q', options=['a', 'b'])
    # a cache entry cut short (a kill, a full disk): said, computed again, rewritten
    cached = api.load(ckpts['retrieval'], cache=str(tmp_path / 'c'))
    want = cached.score([path], ['a red bar'])
    entry = tmp_path / 'c' / os.listdir(tmp_path / 'c')[0]
    entry.write_bytes(entry.read_bytes()[:50])
    again = api.load(ckpts['retrieval'], cache=str(tmp_path / 'c'))
    assert np.array_equal(again.score([path], ['a red bar']), want)
    assert f'cache: {entry} unreadable (SafetensorError: ' in capsys.readouterr().out
    assert api.load(ckpts['retrieval'], cache=str(tmp_path / 'c')).cached(str(entry)) is not None  # rewritten whole


def test_vocab_files_of_every_release_form(ckpts, tmp_path):
    """--vocab: a list, our txt_<task>.json ("vocab"), VIOLETv2's ("ans2label": answer -> class) gave KeyError 'vocab'."""
    for name, obj in [('list.json', VOCAB), ('ours.json', {'train': [], 'vocab': VOCAB}),
                      ('v2.json', {'train': [], 'ans2label': {a: i for i, a in enumerate(VOCAB)}})]:
        (tmp_path / name).write_text(json.dumps(obj))
        assert api.read_vocab(str(tmp_path / name)) == VOCAB
    (tmp_path / 'none.json').write_text('{"train": []}')
    with pytest.raises(KeyError, match=r'none.json: no key "vocab"'):
        api.read_vocab(str(tmp_path / 'none.json'))
    conv = load_tool('convert_ckpt')  # a vocab it cannot use is refused before anything is written
    with pytest.raises(ValueError, match=rf'^the answer vocabulary has 3 entries, the model {len(VOCAB)} classes \(a class '
                                         r'without an answer text: null in a JSON list\)$'):
        conv.convert(ckpts['qaoe'], str(tmp_path / 'q.safetensors'), vocab=VOCAB[:3])
    with pytest.raises(KeyError):
        conv.convert(ckpts['qaoe'], str(tmp_path / 'q.safetensors'), vocab=str(tmp_path / 'none.json'))
    assert not os.path.exists(tmp_path / 'q.safetensors')


def test_bf16_on_request(clips, ckpts):
    """bf16 autocast (the CUDA fast path) runs here on CPU too; its scores stay near fp32's."""
    vids = [str(clips / '_lib' / f) for f in ('red.mp4', 'blue.mp4')]
    s32 = api.load(ckpts['retrieval'], device='cpu').score(vids, ['a red bar'])
    s16 = api.load(ckpts['retrieval'], device='cpu', precision='bf16').score(vids, ['a red bar'])
    assert np.abs(s16 - s32).max() < 0.05 * max(np.abs(s32).max(), 1)
    # QA-OE's head too stays in fp32 (as README says of every head): its bf16 logits (3 digits) tied answers
    m = api.load(ckpts['qaoe'], device='cpu', precision='bf16')
    seen = []
    m.model.fc.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    m.answer(vids[0], 'what colour is it?')
    assert seen == [(torch.float32, torch.float32)]


def test_upright_reaches_the_video_reader(clips, ckpts, capsys, monkeypatch):
    """predict.py --upright (and api.load(upright=True)) reads videos as the extraction tool's --upright does; the
    default reads them as the original extracted them. (The reader itself: tests/test_data.py.)"""
    seen, read_video = [], dataset.read_video
    monkeypatch.setattr(dataset, 'read_video', lambda path, n, upright=False: seen.append(upright) or read_video(path, n, upright))
    path = str(clips / 'mixed' / 'ok.mp4')
    for flags in ([], ['--upright']):
        run_predict(capsys, 'retrieval', '--ckpt', ckpts['retrieval'], '--video', path, '--text', 'a red bar', *flags)
    assert seen == [False, True]


def test_api_as_a_library(clips, ckpts, tmp_path, monkeypatch, capsys):
    """What a notebook met: a video file rewritten (or the same relative name from another folder) scored with the
    first file's features, kept without bound; embed_video's tensors were the memo's own (changed in place, every
    later score changed); config errors were SystemExit, past `except Exception`; load() drew from the caller's
    RNG; a cached entry of the wrong shape failed deep in score(); with a cache, a missing file was a bare
    FileNotFoundError; QA-MC options that the text length cut to one text gave a 1/3 'answer'."""
    red, blue = (str(clips / '_lib' / f) for f in ('red.mp4', 'blue.mp4'))
    mine = str(tmp_path / 'mine.mp4')
    shutil.copy(red, mine)
    m = api.load(ckpts['retrieval'], device='cpu')
    first = m.score([mine], ['a red bar'])
    shutil.copy(blue, mine)
    os.utime(mine, ns=(1, 1))  # (another size or time of change: another video)
    assert np.array_equal(m.score([mine], ['a red bar']), m.score([blue], ['a red bar']))
    assert not np.array_equal(first, m.score([blue], ['a red bar']))
    feat, _ = m.embed_video(blue)
    feat.mul_(0)
    assert np.array_equal(m.score([blue], ['a red bar']), api.load(ckpts['retrieval'], device='cpu').score([blue], ['a red bar']))
    m.forget()
    assert not m.memo
    monkeypatch.setattr(api, 'MEMO_VIDEOS', 1)
    m.score([red, blue], ['x'])
    assert list(m.memo) == [m.video_key(blue)]
    for sets, said in [(['size_imgg=64'], "config error: unknown key 'size_imgg'"), ('size_img=64', 'sets must be a list')]:
        with pytest.raises(ValueError, match=said):
            api.load(ckpts['retrieval'], device='cpu', sets=sets)
    with pytest.raises(ValueError, match=r"^precision must be 'fp32' or 'bf16', got 'fp16'$"):
        api.load(ckpts['retrieval'], precision='fp16')
    with pytest.raises(ValueError, match=r'^n_frames must be an int >= 0'):
        api.load(ckpts['retrieval'], n_frames=True)
    torch.manual_seed(0)
    want = torch.rand(1)
    torch.manual_seed(0)
    api.load(ckpts['retrieval'], device='cpu')
    assert torch.equal(torch.rand(1), want)
    with pytest.raises(ValueError, match=r"^option 1 is 2: a str, not int$"):
        api.load(ckpts['qamc'], device='cpu').answer(red, 'what', options=['a', 2])
    cached = api.load(ckpts['retrieval'], device='cpu', cache=str(tmp_path / 'c'))
    with pytest.raises(dataset.BadVideo, match='nope.mp4'):
        cached.score([str(tmp_path / 'nope.mp4')], ['x'])
    entry = cached.cache_file(cached.video_key(red))
    violet_feat = torch.zeros(3, 5)
    import safetensors.torch
    safetensors.torch.save_file({'feat': violet_feat, 'mask': torch.zeros(3)}, entry)
    capsys.readouterr()
    assert np.array_equal(cached.score([red], ['a red bar']), m.score([red], ['a red bar']))
    assert 'unreadable (ValueError: features [3, 5] and mask [3], expected' in capsys.readouterr().out
    qamc = api.load(ckpts['qamc'], device='cpu')
    long = 'what does the video show in this clip ' * 10
    with pytest.raises(ValueError, match=rf'^options 0 and 1 are the same text to the model once question \+ option is '
                                         rf'cut to size_txt {qamc.args["size_txt"]} tokens: shorten the question$'):
        qamc.answer(red, long, options=['a red bar moves right', 'a blue dot moves up'])
