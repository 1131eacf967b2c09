"""Evaluation from a checkpoint without training (--eval, one process == torchrun), zero-shot QA-MC with the VTM
head, the QA-OE protocol for answers outside the vocabulary, strict checkpoint loading and safetensors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, '_tools'))
import agent  # noqa: E402
import dataset  # noqa: E402
import eval_retrieval  # noqa: E402
import model as violet  # noqa: E402
from make_toy import make_toy  # noqa: E402

TINY = f'{REPO}/_data/bert-tiny'
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Toy corpus; txt_toy-qaoe.json gets answers outside the vocabulary (-1) in train and test."""
    out = str(tmp_path_factory.mktemp('toy'))
    make_toy(out, seed=0, n_videos=2, n_val=2, n_images=2, n_down=8, n_down_eval=8, workers=2)
    path = os.path.join(out, 'txt_toy-qaoe.json')
    qa = json.load(open(path))
    for split, idx in (('train', [0, 3]), ('test', [1, 4, 6])):
        for i in idx:
            qa[split][i].update(answer=-1, answer_text='purple')
    json.dump(qa, open(path, 'w'))
    return out


def args_of(task, toy, *sets):
    return agent.load_args(f'{REPO}/_data/toy/args_toy-{task}.json', [f'txt_backbone={TINY}', f'path_data={toy}', *sets])


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A pretraining checkpoint and a QA-OE one of the tiny model (plain state dicts)."""
    d = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    pre = violet.VIOLET_Pretrain(agent.load_args(f'{REPO}/_data/toy/args_pretrain.json', [f'txt_backbone={TINY}']))
    with torch.no_grad():  # a head that spreads the scores, so that the argmax depends on the inputs
        pre.fc[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    torch.save(pre.state_dict(), d / 'pre.pt')
    return str(d / 'pre.pt')


def run(script, config, sets, torchrun=False, check=True):
    launch = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] if torchrun else []
    r = subprocess.run([sys.executable, *launch, script, config, *sets], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def eval_sets(toy, out, ckpt):
    return ['--eval', '--set', f'path_data={toy}', f'txt_backbone={TINY}', f'path_output={out}', f'path_ckpt={ckpt}',
            'size_batch=3']


def test_qamc_zero_shot_eval_same_under_torchrun(toy, ckpts, tmp_path):
    res = {}
    for world in (1, 2):
        out = str(tmp_path / f'w{world}')
        run('main_qamc.py', f'{REPO}/_data/toy/args_toy-qamc.json', eval_sets(toy, out, ckpts), torchrun=world == 2)
        assert sorted(f for f in os.listdir(out) if f != '.lock') == ['args.json', 'eval.json']  # nothing was trained
        res[world] = json.load(open(os.path.join(out, 'eval.json')))
        assert res[world]['run']['zero_shot'] and res[world]['run']['world'] == world
    assert res[1]['val'] == res[2]['val'] and res[1]['test'] == res[2]['test']
    # independently: the pretraining model's own VTM head on every (video, question + option), best option wins
    args = args_of('qamc', toy)
    pre = violet.VIOLET_Pretrain(args).eval()
    pre.load_ckpt(ckpts, need='all')
    for split, key in (('val', 'val'), ('test', 'test')):
        ds = dataset.Dataset_QAMC(args, split)
        hits, preds = [], []
        for i in range(len(ds)):
            img, txt, mask, ans = ds[i]
            with torch.no_grad():
                f_img, m_img, f_txt, m_txt = pre.go_feat(img[None].expand(5, -1, -1, -1, -1), torch.as_tensor(txt),
                                                         torch.as_tensor(mask))
                preds.append(int(pre.score(f_img, m_img, f_txt, m_txt).argmax()))
                hits.append(preds[-1] == ans)
        assert res[1][key]['ac'] == pytest.approx(np.mean(hits), abs=1e-9)
        assert len(set(preds)) > 1 and 0 < np.mean(hits) < 1  # the choice depends on the inputs: the check can fail


def test_pretrain_eval_uses_the_checkpoints_heads(toy, ckpts, tmp_path):
    """main_pretrain.py --eval: MLM / MVM / VTM accuracy of each dataset's val split with the checkpoint's own heads,
    nothing trained. Heads with zero weights give all-equal logits, whose argmax is class 0: the VTM positive
    (accuracy exactly 1) and the MLM [PAD] id, never a target (exactly 0); the random-headed checkpoint gives neither."""
    flat = torch.load(ckpts)
    for k in ('fc.3.weight', 'fc.3.bias', 'fc_mtm.predictions.decoder.weight', 'fc_mtm.predictions.decoder.bias',
              'fc_mtm.predictions.bias'):
        flat[k] = torch.zeros_like(flat[k])
    torch.save(flat, tmp_path / 'flat.pt')
    res = {}
    for name, ckpt in (('random', ckpts), ('flat', str(tmp_path / 'flat.pt'))):
        out = str(tmp_path / name)
        r = run('main_pretrain.py', f'{REPO}/_data/toy/args_pretrain.json', eval_sets(toy, out, ckpt))
        assert sorted(f for f in os.listdir(out) if f != '.lock') == ['args.json', 'eval.json']  # nothing was trained
        res[name] = json.load(open(os.path.join(out, 'eval.json')))
        assert res[name]['run']['head'] == 'pretraining heads' and not res[name]['run']['zero_shot']
        assert sorted(k for k in res[name] if k != 'run') == ['toyimg', 'toyvid'] and 'toyvid: mtm ' in r.stdout
    for d in ('toyvid', 'toyimg'):
        assert res['flat'][d]['vtm'] == 1.0 and res['flat'][d]['mtm'] == 0.0 and 0 <= res['flat'][d]['mvm'] <= 1
        assert res['random'][d]['vtm'] < 1.0


def test_qaoe_unknown_answers_train_and_eval(toy, tmp_path):
    """Training on questions with answer -1 runs (no loss for them); evaluation counts them wrong: ac over all
    questions, ac_iv over the in-vocabulary ones; vocab.json and the .safetensors checkpoint are written."""
    out = str(tmp_path / 'train')
    run('main_qaoe.py', f'{REPO}/_data/toy/args_toy-qaoe.json',
        ['--set', f'path_data={toy}', f'txt_backbone={TINY}', f'path_output={out}', 'size_epoch=1', 'size_batch=4',
         'save_safetensors=true'])
    log = agent.read_run_log(out)
    assert np.isfinite(log['ls_tr'][0]) and set(log) >= {'ac_vl', 'ac_ts', 'ac_iv_vl', 'ac_iv_ts'}
    qa = json.load(open(os.path.join(toy, 'txt_toy-qaoe.json')))
    assert json.load(open(os.path.join(out, 'vocab.json'))) == qa['vocab']
    ckpt = os.path.join(out, 'ckpt_violet_toy-qaoe_1.pt')
    st = violet.read_ckpt(ckpt.replace('.pt', '.safetensors'))
    pt = torch.load(ckpt, weights_only=True)
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in pt)

    ev = str(tmp_path / 'eval')
    run('main_qaoe.py', f'{REPO}/_data/toy/args_toy-qaoe.json', eval_sets(toy, ev, ckpt))
    res = json.load(open(os.path.join(ev, 'eval.json')))
    assert not res['run']['zero_shot']
    args = args_of('qaoe', toy)
    mdl = violet.VIOLET_QAOE(args).eval()
    mdl.load_ckpt(ckpt, need='all')
    items = qa['test']
    pred = []
    for it in items:  # by hand, from the json: -1 can never be predicted, so it is always wrong
        ds = dataset.Dataset_QAOE(args, 'test')
        txt, mask = ds.str2txt(it['question'])
        with torch.no_grad():
            pred.append(int(mdl(ds.get_img(it['video'])[None], torch.as_tensor(txt)[None],
                                torch.as_tensor(mask)[None]).argmax()))
    hits = [p == it['answer'] for p, it in zip(pred, items)]
    n_iv = sum(it['answer'] != -1 for it in items)
    assert n_iv == len(items) - 3
    assert res['test']['ac'] == pytest.approx(sum(hits) / len(items), abs=1e-9)
    assert res['test']['ac_iv'] == pytest.approx(sum(hits) / n_iv, abs=1e-9)
    assert log['ac_ts'][0] == pytest.approx(res['test']['ac'], abs=1e-9)


def test_qaoe_step_gives_unknown_answers_no_loss():
    import main_qaoe
    out = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ans = torch.tensor([0, -1, -1, 1])

    class Fixed(torch.nn.Module):
        def forward(self, img, txt, mask):
            return out
    loss, _, hits = main_qaoe.QAOE.step(None, Fixed(), (None, None, None, ans), None)
    ref = torch.nn.functional.cross_entropy(out[[0, 3]], ans[[0, 3]])
    assert torch.allclose(loss, ref)
    assert [int(x) for x in hits['ac']] == [1, 4] and [int(x) for x in hits['ac_iv']] == [1, 2]


def test_retrieval_eval_mode_v2t_and_torchrun(toy, ckpts, tmp_path):
    """main_retrieval.py --eval = eval_retrieval's ranking (both directions), the same under torchrun; a
    pretraining checkpoint is zero-shot retrieval with its VTM head."""
    out = str(tmp_path / 'w2')
    run('main_retrieval.py', f'{REPO}/_data/toy/args_toy-retrieval.json', eval_sets(toy, out, ckpts), torchrun=True)
    res = json.load(open(os.path.join(out, 'eval.json')))
    assert res['run']['zero_shot']
    args = args_of('retrieval', toy, 'size_batch=3')
    pre = violet.VIOLET_Pretrain(args)
    pre.load_ckpt(ckpts, need='all')
    for split in ('val', 'test'):
        ref = eval_retrieval.evaluate(pre, args, split, torch.device('cpu'), size_pair=64)
        assert res[split]['ranks'] == ref['ranks'] and res[split]['v2t']['ranks'] == ref['v2t']['ranks']


def test_eval_needs_every_key(toy, ckpts, tmp_path):
    """--eval with a checkpoint that does not fill the model (QA-OE head from a pretraining file) or without one
    stops with one line naming the file and the keys."""
    r = run('main_qaoe.py', f'{REPO}/_data/toy/args_toy-qaoe.json', eval_sets(toy, str(tmp_path / 'a'), ckpts),
            check=False)
    assert r.returncode != 0
    assert re.fullmatch(re.escape(f"path_ckpt: {ckpts}: 2 of the model's ") + r"\d+" + re.escape(
        " keys are missing from the file or of another shape (need=all): fc.3.bias ([1] in the file, [12] in the "
        "model), fc.3.weight ([1, 256] in the file, [12, 256] in the model); it does not hold this model (another "
        "task, size_vocab or VT/BERT size?)"), r.stderr.strip().splitlines()[-1])
    assert not os.path.exists(tmp_path / 'a')  # the folder it made for the results is not left behind empty
    (tmp_path / 'mine').mkdir()  # one that was there stays
    r = run('main_qaoe.py', f'{REPO}/_data/toy/args_toy-qaoe.json', eval_sets(toy, str(tmp_path / 'mine'), ckpts),
            check=False)
    assert r.returncode != 0 and os.listdir(tmp_path / 'mine') == ['.lock']
    r = run('main_qamc.py', f'{REPO}/_data/toy/args_toy-qamc.json', eval_sets(toy, str(tmp_path / 'b'), ''), check=False)
    assert r.stderr.strip().splitlines()[-1] == ('--eval evaluates the weights of a checkpoint: --set path_ckpt=FILE '
                                                '(not --resume)')


def test_eval_checks_every_split_first_and_leaves_no_folder(toy, ckpts, tmp_path, monkeypatch, capsys):
    """--eval did not check the data first: a video missing from test stopped it after val was scored, and the
    args.json it left made the rerun 'another run's files: continue that run with --resume' (which had nothing to
    resume). Every split is checked first now, and a failed --eval leaves no folder it made."""
    import shutil
    import main_qamc
    data = tmp_path / 'data'
    shutil.copytree(toy, data)
    qs = json.load(open(data / 'txt_toy-qamc.json'))
    qs['test'][2]['video'] = 'nosuchvideo'
    json.dump(qs, open(data / 'txt_toy-qamc.json', 'w'))
    argv = [f'{REPO}/_data/toy/args_toy-qamc.json', '--eval', '--set', f'path_data={data}', f'txt_backbone={TINY}',
            f'path_output={tmp_path / "out"}', f'path_ckpt={ckpts}']
    with pytest.raises(SystemExit) as e:
        agent.main(main_qamc.QAMC, '', argv)
    assert str(e.value) == f'{data}/txt_toy-qamc.json["test"][2]: no video "nosuchvideo" in {data}/img_toy.pkl'
    assert 'evaluation only' not in capsys.readouterr().out and not os.path.exists(tmp_path / 'out')
    # a failure during the evaluation itself (a frame found corrupt when decoded): no folder left either
    qs['test'][2]['video'] = qs['test'][1]['video']
    json.dump(qs, open(data / 'txt_toy-qamc.json', 'w'))

    def corrupt(task, trainer):
        raise dataset.BadSample(f'{data}/img_toy.tsv line 3: cannot decode image')
    monkeypatch.setattr(main_qamc.QAMC, 'evaluate_only', corrupt)
    with pytest.raises(SystemExit, match='cannot decode image'):
        agent.main(main_qamc.QAMC, '', argv)
    assert not os.path.exists(tmp_path / 'out')
    monkeypatch.undo()
    agent.main(main_qamc.QAMC, '', argv)  # the rerun: not refused
    assert {'args.json', 'eval.json'} <= set(os.listdir(tmp_path / 'out'))


def test_load_ckpt_need_and_safetensors(tmp_path):
    import safetensors.torch
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qamc.json', [f'txt_backbone={TINY}'])
    torch.manual_seed(0)
    src = violet.VIOLET_QAMC(args)
    sd = src.state_dict()
    agent.save_safetensors(sd, str(tmp_path / 'm.safetensors'))
    dst = violet.VIOLET_QAMC(args)
    assert dst.load_ckpt(str(tmp_path / 'm.safetensors'), need='all') == ([], [])
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    part = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    safetensors.torch.save_file(part, str(tmp_path / 'enc.safetensors'))
    with pytest.raises(violet.CheckpointError, match=r"4 of the model's \d+ keys are missing .*\(need=all\)"):
        dst.load_ckpt(str(tmp_path / 'enc.safetensors'), need='all')
    assert dst.load_ckpt(str(tmp_path / 'enc.safetensors'), need='encoders')[0] == ['fc.1.bias', 'fc.1.weight',
                                                                                    'fc.3.bias', 'fc.3.weight']
    noenc = {k: v for k, v in sd.items() if not k.startswith('trsfr.layer.1.')}
    torch.save(noenc, tmp_path / 'noenc.pt')
    with pytest.raises(violet.CheckpointError, match=r"need=encoders\): trsfr\.layer\.1\."):
        dst.load_ckpt(str(tmp_path / 'noenc.pt'), need='encoders')
    assert dst.load_ckpt(str(tmp_path / 'noenc.pt'))[0]  # 'any': loads what fits, reports the rest
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(violet.CheckpointError, match='junk.safetensors: not a readable safetensors file: '):
        dst.load_ckpt(str(tmp_path / 'junk.safetensors'))
