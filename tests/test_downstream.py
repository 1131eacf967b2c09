"""Fine-tuning scripts under a 2-process torchrun, initialisation from a pretraining checkpoint, config errors."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, '_tools'))
import agent  # noqa: E402
import api  # noqa: E402
import dataset  # noqa: E402
import model as violet  # noqa: E402
from make_toy import make_toy  # noqa: E402

TINY = f'{REPO}/_data/bert-tiny'


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('toy'))
    make_toy(out, seed=0, n_videos=4, n_val=4, n_images=4, n_down=16, n_down_eval=8, workers=2)
    return out


@pytest.fixture(scope='module')
def ckpt_pretrain(tmp_path_factory):
    """A pretraining checkpoint of the tiny model (plain state dict, as main_pretrain.py writes)."""
    args = agent.load_args(f'{REPO}/_data/toy/args_pretrain.json', [f'txt_backbone={TINY}'])
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt_violet_pretrain.pt')
    torch.save(violet.VIOLET_Pretrain(args).state_dict(), path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def expected_not_loaded(cls, args, path):
    """Keys of cls that the pretraining checkpoint cannot fill: absent there, or another shape."""
    own, src = cls(args).state_dict(), torch.load(path, weights_only=True)
    return sorted(k for k, v in own.items()
                  if (k not in src or src[k].shape != v.shape) and not k.endswith('relative_position_index'))


@pytest.mark.parametrize('task,script,launcher', [
    ('qamc', 'main_qamc.py', 'torchrun'),
    ('qaoe', 'main_qaoe.py', 'launch'),  # the legacy launcher passes --local-rank
    ('retrieval', 'main_retrieval.py', 'torchrun'),
])
def test_two_process_epoch(toy, ckpt_pretrain, tmp_path, task, script, launcher):
    out = str(tmp_path / task)
    config = f'{REPO}/_data/toy/args_toy-{task}.json'
    if launcher == 'torchrun':
        cmd = ['torchrun', '--standalone', '--nproc_per_node=2', script]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={free_port()}', script]
    sets = [f'path_data={toy}', f'txt_backbone={TINY}', f'path_output={out}', f'path_ckpt={ckpt_pretrain}',
            'size_epoch=1', 'size_batch=4']
    r = subprocess.run(cmd + [config, '--set', *sets], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, f'{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    assert r.stdout.count('===== Loaded') == 1, r.stdout  # rank 0 alone says what it loaded
    files = set(os.listdir(out))
    assert {f'ckpt_violet_toy-{task}_0.pt', f'ckpt_violet_toy-{task}_1.pt', 'log.json', 'args.json', 'resume.pt'} <= files
    with open(os.path.join(out, 'log.json')) as f:  # the original's keys alone, in its order
        assert list(json.load(f)) == ['ls_tr', 'ac_vl', 'ac_ts']
    with open(os.path.join(out, 'log_extra.json')) as f:  # what this project counts besides
        assert list(json.load(f)) == ['ac_iv_vl', 'ac_iv_ts'] * (task == 'qaoe') + ['n_skipped', 'n_nonfinite', 'n_overflow', 'not_loaded']
    log = agent.read_run_log(out)
    assert len(log['ls_tr']) == len(log['ac_vl']) == len(log['ac_ts']) == 1
    assert all(0 <= log[k][0] <= 1 for k in ('ac_vl', 'ac_ts'))
    # accuracy over the whole split: a multiple of 1/len(split) (8 items), not a mean of batch means
    assert all(abs(log[k][0] * 8 - round(log[k][0] * 8)) < 1e-9 for k in ('ac_vl', 'ac_ts'))
    # everything the pretraining checkpoint holds was loaded: only the head keys it lacks (or shapes) are not
    args = json.load(open(os.path.join(out, 'args.json')))
    cls = violet.MODELS[task]
    assert log['not_loaded'] == expected_not_loaded(cls, args, ckpt_pretrain)
    if task == 'qaoe':
        assert log['not_loaded'] == ['fc.3.bias', 'fc.3.weight']  # 12 answer classes vs the VTM head's 1 output
    else:
        assert log['not_loaded'] == []
    sd = torch.load(os.path.join(out, f'ckpt_violet_toy-{task}_1.pt'), weights_only=True)
    assert sd.keys() == cls(args).state_dict().keys()


def test_load_ckpt_reports_only_head_keys(ckpt_pretrain):
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qaoe.json', [f'txt_backbone={TINY}'])
    not_loaded, unexpected = violet.VIOLET_QAOE(args).load_ckpt(ckpt_pretrain)
    assert not_loaded == ['fc.3.bias', 'fc.3.weight']
    assert set(unexpected) == {k for k in torch.load(ckpt_pretrain, weights_only=True)
                               if k.startswith(('fc_mtm.', 'fc_mvm.', 'fc.3.'))}


@pytest.mark.parametrize('wrap', [None, 'state_dict', 'model_state_dict'])
def test_load_ckpt_saved_from_ddp_wrapper(ckpt_pretrain, tmp_path, wrap):
    """A state dict saved from DDP / DataParallel (every key 'module.'-prefixed) used to be refused as 'another task';
    one kept under 'state_dict' (PyTorch Lightning) or 'model_state_dict' beside an optimiser state was 'a key of
    another kind'."""
    sd = torch.load(ckpt_pretrain, weights_only=True)
    saved = {f'module.{k}': v for k, v in sd.items()}
    if wrap:
        saved = {wrap: saved, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 3}
    torch.save(saved, tmp_path / 'ddp.pt')
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qaoe.json', [f'txt_backbone={TINY}'])
    m = violet.VIOLET_QAOE(args)
    assert m.load_ckpt(str(tmp_path / 'ddp.pt'))[0] == ['fc.3.bias', 'fc.3.weight']
    assert torch.equal(m.state_dict()['enc_img.emb_cls'], sd['enc_img.emb_cls'])


def test_load_ckpt_names_the_mvm_target_of_the_file(ckpt_pretrain):
    """A pixel-MVM pretraining checkpoint in eval_retrieval.py --zero-shot with a retrieval config (mvm_target 'vq' by
    default) was refused as 'another task, size_vocab or VT/BERT size?'."""
    args = agent.load_args(f'{REPO}/_data/toy/args_pretrain.json', [f'txt_backbone={TINY}', 'mvm_target=pixel'])
    with pytest.raises(violet.CheckpointError, match=r"fc_mvm.3.bias \(\[8192\] in the file, \[3072\] in the model\).*"
                                                     r"its MVM head is for mvm_target 'vq': set mvm_target=vq$"):
        violet.VIOLET_Pretrain(args).load_ckpt(ckpt_pretrain, 'all')


def error_of(*sets, path=f'{REPO}/_data/args_tgif-action.json'):
    with pytest.raises(SystemExit) as e:
        agent.load_args(path, sets)
    return str(e.value)


def test_config_errors(tmp_path):
    assert error_of('lrr=1e-4') == "config error: unknown key 'lrr' (--set); did you mean 'lr'?"
    assert error_of('lr=fast') == "config error: key 'lr' must be float, got str 'fast' (--set)"
    assert error_of('size_batch=2.5') == "config error: key 'size_batch' must be int, got float 2.5 (--set)"
    assert error_of('skip_bad=1') == "config error: key 'skip_bad' must be bool, got int 1 (--set)"
    assert error_of('precision=fp8') == "config error: key 'precision' must be one of ['auto', 'fp16', 'bf16', 'fp32'], got 'fp8' (--set)"
    assert error_of('lr') == "config error: --set takes KEY=VALUE, got 'lr'"
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'type': 'qamc', 'size_epochs': 3}))
    assert error_of(path=str(bad)) == f"config error: unknown key 'size_epochs' ({bad}); did you mean 'size_epoch'?"
    args = agent.load_args(f'{REPO}/_data/args_tgif-action.json', ['lr=3', 'vt_depths=[2,2,2,2]', 'task=x y'])
    assert args['lr'] == 3 and args['vt_depths'] == [2, 2, 2, 2] and args['task'] == 'x y' and args['size_option'] == 5
    # the script names the key on stderr and exits non-zero before starting anything
    r = subprocess.run([sys.executable, 'main_qamc.py', '_data/args_tgif-action.json', '--set', 'size_optoin=4'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().endswith("config error: unknown key 'size_optoin' (--set); did you mean 'size_option'?")
    r = subprocess.run([sys.executable, 'main_qaoe.py', '_data/args_tgif-action.json'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "config error: key 'type' is 'qamc', but this script trains 'qaoe'" in r.stderr


def test_config_values_out_of_range_and_config_files(tmp_path):
    """NaN and infinity passed every bound (lr=Infinity trained NaN weights to 'done'; max_skip_frac=NaN switched the
    skip guard off); upper bounds, keys that must agree, and the config file itself (a repeated key, not UTF-8)."""
    for kv, v in (('lr=Infinity', 'inf'), ('lr=1e400', 'inf'), ('max_skip_frac=NaN', 'nan'), ('max_grad_norm=-Infinity', '-inf')):
        assert error_of(kv) == f"config error: key '{kv.split('=')[0]}' must be a finite number, got {v} (--set)"
    assert error_of('vt_window=[8,NaN,4]') == ("config error: key 'vt_window' must hold ints, got float nan in "
                                               "[8, nan, 4] (--set)")
    assert error_of('head_dropout=1.5') == "config error: key 'head_dropout' must be in 0..1, got 1.5 (--set)"
    assert error_of('size_txt=2') == "config error: key 'size_txt' must be >= 3, got 2 (--set)"  # ([CLS] [SEP]: no word)
    assert error_of('vt_drop_path=2') == "config error: key 'vt_drop_path' must be in 0..1, got 2 (--set)"
    assert error_of('seed=-1') == "config error: key 'seed' must be in 0..9223372036854775807, got -1 (--set)"
    assert agent.load_args(f'{REPO}/_data/args_tgif-action.json', ['head_dropout=1', 'seed=4294967296'])['seed'] == 2**32
    assert error_of('vt_heads=[3,3,3,3]', 'vt_dim=16') == ("config error: key 'vt_heads' [3, 3, 3, 3] does not fit "
                                                           "vt_dim 16: stage 1 is 16 wide, which its 3 heads do not divide")
    twice = tmp_path / 'twice.json'
    twice.write_text('{"type": "qamc", "lr": 1e-4, "lr": -5}')
    assert error_of(path=str(twice)) == f"config error: {twice}: key 'lr' is given twice"
    latin = tmp_path / 'latin1.json'
    latin.write_bytes(b'{"task": "caf\xe9"}')
    assert error_of(path=str(latin)) == f'config error: {latin}: not UTF-8 text (byte 0xe9 at offset 13): save it as UTF-8'
    bom = tmp_path / 'bom.json'  # Notepad's UTF-8 (a BOM first) was 'not valid JSON'
    bom.write_text('{"task": "caf\u00e9", "lr": 1e-5}', encoding='utf-8-sig')
    assert agent.load_args(str(bom), [])['lr'] == 1e-5
    # a folder: said (it was 'no config file'), a run's with its args.json and --resume
    assert error_of(path=str(tmp_path)) == f'config error: {tmp_path} is a folder, not a config file'
    (tmp_path / 'args.json').write_text('{}')
    assert error_of(path=str(tmp_path)) == (f"config error: {tmp_path} is a folder, not a config file (a run's: its "
                                            f'config is {tmp_path}/args.json; --resume {tmp_path} goes on with a '
                                            f'stopped run)')
    listed = tmp_path / 'list.json'
    listed.write_text('[]')
    assert error_of(path=str(listed)) == f'config error: {listed} must hold a JSON object, not list'
    with pytest.raises(ValueError, match=f'^{listed} must hold a JSON object, not list$'):
        api.find_config('x.pt', str(listed))
    with pytest.raises(ValueError, match=r'^config: its "config" must be a JSON object of keys, not list$'):
        api.find_config('x.pt', {'config': []})
    # a run's log.json given for its args.json: named as not a config, with the file (convert_ckpt said 'saved args')
    log = tmp_path / 'log.json'
    log.write_text(json.dumps({'ls_tr': [1.5], 'ac_vl': [0.5], 'ac_ts': [0.4], 'n_skipped': 0}))
    said = (f"config error: {log}: not a config, none of its keys is one ('ls_tr', 'ac_vl', 'ac_ts', ...): a run's "
            f"config is its args.json, a task's _data/args_<task>.json")
    assert error_of(path=str(log)) == said
    torch.save({}, tmp_path / 'x.pt')
    with pytest.raises(ValueError, match=f'^{re.escape(said)}$'):  # (a library's error, not SystemExit)
        api.load(str(tmp_path / 'x.pt'), config=str(log))


def test_retrieval_loss_directions():
    """'v2t' (the original) is each video's CE over the batch's texts; 'both' averages in each text's CE over
    the batch's videos."""
    import main_retrieval
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 5, 3, 64, 64, generator=gen)
    txt = torch.tensor([[101, 1037, 2417, 2675, 102], [101, 1037, 2630, 11089, 102], [101, 1996, 3756, 3347, 102]])
    mask = torch.ones_like(txt)
    losses = {}
    for how in ('v2t', 'both'):
        args = agent.load_args(f'{REPO}/_data/toy/args_toy-retrieval.json', [f'txt_backbone={TINY}', f'retrieval_loss={how}'])
        torch.manual_seed(0)
        mdl = violet.VIOLET_Retrieval(args).eval()
        with torch.no_grad():  # a head that spreads the scores (at initialisation they are all about equal)
            mdl.fc[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        losses[how] = main_retrieval.Retrieval(args).step(mdl, [img, txt, mask], None)[0]
    out, ans = mdl(img, txt, mask)
    v2t, t2v = F.cross_entropy(out, ans), F.cross_entropy(out.t(), ans)
    assert abs(v2t - t2v) > 1e-3  # the two directions differ on these scores, so the checks below can fail
    assert torch.allclose(losses['v2t'], v2t, atol=1e-6)
    assert torch.allclose(losses['both'], (v2t + t2v) / 2, atol=1e-6)
    assert error_of('retrieval_loss=t2v') == ("config error: key 'retrieval_loss' must be one of ['v2t', 'both'], "
                                              "got 't2v' (--set)")


def ddp_qaoe_worker(rank, world, init_file, out_file):
    """One rank of a DDP QA-OE step on rows [3 rank, 3 rank + 3) of whole_batch()."""
    import main_qaoe
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.manual_seed(0)
    head = Head()
    ddp = torch.nn.parallel.DistributedDataParallel(head)
    x, ans = whole_batch()
    rows = slice(3 * rank, 3 * rank + 3)
    loss, _, hits = main_qaoe.QAOE({'task': 'qa', 'dataset': 'v'}).step(ddp, (x[rows], None, None, ans[rows]), None)
    loss.backward()
    torch.save([head.fc.weight.grad, loss.detach(), hits], f'{out_file}.{rank}')
    torch.distributed.destroy_process_group()


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, img, txt, mask):
        return self.fc(img)


def whole_batch():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([3, -1, -1, 1, 2, 4])  # rank 0: one answer in the vocabulary, rank 1: three


def test_qaoe_loss_under_ddp_is_the_whole_batchs_mean(tmp_path):
    """Two DDP ranks train as the original's one DataParallel batch: its loss is one mean over the answers != -1 of
    the whole batch. A mean per rank (then DDP's average of the gradients) weighed rank 0's one answer 3x as much
    as each of rank 1's."""
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    head = Head()
    x, ans = whole_batch()
    ref = torch.nn.functional.cross_entropy(head(x, None, None), ans, ignore_index=-1)
    ref.backward()
    mp.spawn(ddp_qaoe_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out')), nprocs=2)
    (grad0, loss0, hits0), (grad1, loss1, hits1) = [torch.load(tmp_path / f'out.{r}') for r in range(2)]
    assert torch.equal(grad0, grad1)
    assert torch.allclose(grad0, head.fc.weight.grad, atol=1e-6)
    assert torch.allclose((loss0 + loss1) / 2, ref, atol=1e-6)  # the logged unit loss: the mean over the ranks
    assert hits0['ac'][1] == 3 and hits0['ac_iv'][1] == 1 and hits1['ac_iv'][1] == 3  # hits stay per rank


@pytest.mark.parametrize('n, size_batch, world', [(13, 3, 2), (12, 3, 4), (5, 4, 3), (30, 6, 4)])
def test_eval_batches_are_the_single_process_ones(n, size_batch, world):
    """Fine-tuning's evaluation under torchrun: each rank's batches are batches of the single process (consecutive
    items, as the original's DataParallel split its batch), so retrieval's in-batch accuracy does not depend on the
    process count (every world-th item paired items world apart); pretraining keeps every world-th item (the
    original's DistributedSampler). Every item once; every rank has at least n_common batches (stop signals)."""
    import main_pretrain
    import main_retrieval
    assert main_retrieval.Retrieval.eval_blocks and not main_pretrain.Pretrain.eval_blocks
    single = [list(range(i, min(i + size_batch, n))) for i in range(0, n, size_batch)]
    for blocks in (True, False):
        batches, counts = [], []
        for rank in range(world):
            mine, n_common = agent.eval_indices(n, size_batch, rank, world, blocks)
            mine_batches = [mine[i:i + size_batch] for i in range(0, len(mine), size_batch)]
            batches += mine_batches
            counts.append(len(mine_batches))
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert n_common == min(counts)
        assert (sorted(batches) == single) == blocks


def test_training_refuses_a_checkpoint_without_the_encoders(toy, tmp_path):
    """path_ckpt whose encoder tensors do not fit stops the run (it used to train from random weights with
    'not loaded: [...165 keys]'); init_partial: true allows it on purpose, but not a file of which no key fits (that
    trained from random weights after 'Loaded ...: 0 keys')."""
    import main_qamc
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qamc.json', [f'txt_backbone={TINY}', f'path_data={toy}'])
    sd = violet.VIOLET_QAMC(args).state_dict()
    torch.save({k: torch.zeros(*v.shape, 2) for k, v in sd.items()}, tmp_path / 'wrong.pt')
    torch.save({**torch.load(tmp_path / 'wrong.pt'), 'fc.1.bias': sd['fc.1.bias'] + 1}, tmp_path / 'partial.pt')
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        agent.main(main_qamc.QAMC, '', [f'{REPO}/_data/toy/args_toy-qamc.json', '--set', f'txt_backbone={TINY}',
                                        f'path_data={toy}', f'path_ckpt={tmp_path / "partial.pt"}', f'path_output={out}'])
    assert str(e.value).startswith(f"path_ckpt: {tmp_path / 'partial.pt'}: ")
    assert 'set init_partial: true to start from a partial checkpoint on purpose' in str(e.value)
    assert not os.path.exists(out / 'ckpt_violet_toy-qamc_0.pt')
    # Video Swin weights of another shape (path_vt): one line naming that key, not a traceback nor 'path_ckpt'
    vt = {k.removeprefix('enc_img.swin.'): torch.zeros(*v.shape, 2) for k, v in sd.items() if k.startswith('enc_img.swin.')}
    torch.save(vt, tmp_path / 'vt.pt')
    with pytest.raises(SystemExit) as e:
        agent.main(main_qamc.QAMC, '', [f'{REPO}/_data/toy/args_toy-qamc.json', '--set', f'txt_backbone={TINY}',
                                        f'path_data={toy}', f'path_vt={tmp_path / "vt.pt"}', f'path_output={out}'])
    assert str(e.value).startswith(f"path_vt: {tmp_path / 'vt.pt'}: Video Swin weights do not fit the configured VT (")
    # init_partial: the keys that fit are loaded, the rest reported; a file of which nothing fits is still refused
    trainer = agent.Trainer(main_qamc.QAMC(dict(args, path_ckpt=str(tmp_path / 'partial.pt'), init_partial=True)),
                            torch.device('cpu'))
    assert len(trainer.not_loaded) == sum(not k.endswith('relative_position_index') for k in sd) - 1
    assert torch.equal(trainer.raw.state_dict()['fc.1.bias'], sd['fc.1.bias'] + 1)
    with pytest.raises(violet.CheckpointError, match=r"^.*wrong.pt: none of the file's \d+ keys fits the model \("
                                                     r"enc_img.emb_cls \(\[1, 1, 1, 128, 2\] in the file, \[1, 1, 1, 128\] in "
                                                     r"the model\), .*; it does not hold this model's weights$"):
        agent.Trainer(main_qamc.QAMC(dict(args, path_ckpt=str(tmp_path / 'wrong.pt'), init_partial=True)),
                      torch.device('cpu'))


def test_step_log_and_tensorboard(toy, tmp_path):
    """steps.jsonl: one line per optimiser step, numbered on across a resume, whose losses average to log.json's
    ls_tr per epoch, and one line per evaluation; TensorBoard holds the same scalars; the plot script reads it."""
    import main_qamc
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'run'
    sets = [f'txt_backbone={TINY}', f'path_data={toy}', f'path_output={out}', 'size_epoch=2', 'size_batch=4',
            'log_tb=true']
    agent.main(main_qamc.QAMC, '', [f'{REPO}/_data/toy/args_toy-qamc.json', '--set', *sets, 'stop_after_steps=5'])
    agent.main(main_qamc.QAMC, '', ['--resume', str(out)])
    lines = [json.loads(x) for x in open(out / 'steps.jsonl')]
    train = [r for r in lines if 'eval' not in r]
    evals = [r for r in lines if 'eval' in r]
    assert [r['step'] for r in train] == list(range(1, 9)) and [r['unit_step'] for r in train] == [1, 2, 3, 4] * 2
    log = agent.read_run_log(out)
    # the derived frame count is recorded (the config says 0): the toy's stored frames per video
    stored = {len(v) for v in dataset.load_pickle(f'{toy}/img_toy.pkl').values()}
    assert json.load(open(out / 'args.json'))['size_frame'] == stored.pop() and not stored
    for e in range(2):
        assert abs(sum(r['loss'] for r in train[4*e:4*e+4]) / 4 - log['ls_tr'][e]) < 1e-6
        assert all(r['losses']['tr'] == r['loss'] and r['lr'] == 1e-4 and r['samples_per_s'] > 0 for r in train)
    assert [(r['step'], r['unit'], r['eval']['vl/ac'], r['eval']['ts/ac']) for r in evals] == [
        (4 * (e + 1), f'epoch {e + 1}', log['ac_vl'][e], log['ac_ts'][e]) for e in range(2)]
    tb = EventAccumulator(str(out / 'tb'))
    tb.Reload()
    got = [(s.step, s.value) for s in tb.Scalars('train/loss')]
    assert [g[0] for g in got] == list(range(1, 9))
    assert all(abs(v - r['loss']) < 1e-5 for (_, v), r in zip(got, train))
    assert [(s.step, round(s.value, 6)) for s in tb.Scalars('eval/vl/ac')] == [(4 * (e + 1), round(log['ac_vl'][e], 6))
                                                                            for e in range(2)]
    assert {'train/lr', 'train/samples_per_s', 'train/tr', 'eval/ts/ac'} <= set(tb.Tags()['scalars'])
    # the plot script: a cut last line is left out, a repeated step keeps its last line, an image is written
    with open(out / 'steps.jsonl', 'a') as f:
        f.write(json.dumps({**train[-1], 'loss': 9.0}) + '\n{"step": 9, "lo')
    import plot_curves
    steps, ev = plot_curves.read_steps(str(out / 'steps.jsonl'))
    assert [r['step'] for r in steps] == list(range(1, 9)) and steps[-1]['loss'] == 9.0 and len(ev) == 2
    r = subprocess.run([sys.executable, '_tools/plot_curves.py', str(out), '--out', str(tmp_path / 'c.png')], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert open(tmp_path / 'c.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    # a line that is JSON but not a step, an empty log, an --out under a file: one line each (tracebacks, or an
    # empty panel and 'wrote')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'steps.jsonl').write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n{"step": 3, "eval": 5}\n')
    with pytest.raises(SystemExit, match=r'bad/steps.jsonl line 2: not a step line'):
        plot_curves.read_steps(str(tmp_path / 'bad' / 'steps.jsonl'))
    (tmp_path / 'bad' / 'steps.jsonl').write_text('')
    for run, png, said in [(tmp_path / 'bad', tmp_path / 'd.png', 'no step logged yet'),
                           (out, tmp_path / 'c.png' / 'x.png', f'--out {tmp_path}/c.png/x.png: cannot write it: ')]:
        r = subprocess.run([sys.executable, '_tools/plot_curves.py', str(run), '--out', str(png)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and said in r.stderr.strip().splitlines()[-1], r.stderr
