"""eval_retrieval.py and bench.py: exact metrics (the original's ranking, and the strict one), sharded ==
single-process ranks,
every caption ranked, the CLI end to end, and pair scoring close to the bare cross-encoder's speed."""
import fcntl
import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import agent
import dataset
import eval_retrieval
import model as violet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, '_tools'))
import make_toy  # noqa: E402

SMALL = dict(model_preset='toy', txt_backbone=os.path.join(ROOT, '_data', 'bert-tiny'), size_img=64, size_txt=16)
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def brute_ranks(score, true_video):
    """The definition, one pair at a time: 1 + other videos scoring >= the true one; NaN ranks last."""
    ranks = []
    for s, t in zip(score.tolist(), true_video.tolist()):
        if math.isnan(s[t]):
            ranks.append(len(s))
            continue
        ranks.append(1 + sum(1 for j, x in enumerate(s) if j != t and not math.isnan(x) and x >= s[t]))
    return ranks


def original_ranks(score, true_video):
    """The original's eval_retrieval, literally: per text, [video, float(sigmoid(score))] pairs in video order, sorted
    by -probability (Python's stable sort), rank = position of the own video + 1; R@k summed as 1/n per hit."""
    ranks = []
    for i_t, t in enumerate(true_video.tolist()):
        tmp = sorted([[v, original_sigmoid(o)] for v, o in enumerate(score[i_t].tolist())], key=lambda d: -d[1])
        ranks.append([d[0] for d in tmp].index(t) + 1)
    res = {'r@1': 0, 'r@5': 0, 'r@10': 0}
    for p in ranks:
        for k in (1, 5, 10):
            if p <= k:
                res[f'r@{k}'] += 1.0 / len(ranks)
    return ranks, res


def original_sigmoid(x):
    """One float32 sigmoid as the original's GPU took it, 1 / (1 + expf(-x)), element by element (exp rounded)."""
    with np.errstate(over='ignore'):
        e = np.float32(np.exp(-np.float64(x)))
    return float(np.float32(1) / (np.float32(1) + e))


def test_equal_scores_tie_wherever_they_lie():
    """A video scoring bit-equal to the own video ties with it (the original's sigmoid is one function of the score):
    torch.sigmoid on the CPU rounded the last elements of a matrix (its scalar tail) otherwise than the rest, so the
    own video last of 33, scoring as every other, was ranked 1 instead of 33 for about 4 % of scores."""
    xs = (torch.rand(600, generator=torch.Generator().manual_seed(0)) * 40 - 20).tolist()
    ranks = [eval_retrieval.rank_metrics(torch.full((1, 33), x), torch.tensor([32]))['ranks'][0] for x in xs]
    assert ranks == [33] * len(xs)
    assert [original_sigmoid(x) for x in xs[:50]] == eval_retrieval.sigmoid32(torch.tensor(xs[:50])).tolist()
    # saturation where the original's saturates: 1 + exp(-x) rounds to 1 above x = 16.64 in float32
    assert eval_retrieval.sigmoid32(torch.tensor([16.5, 16.7, 100.])).tolist() == [original_sigmoid(16.5), 1.0, 1.0]
    assert original_sigmoid(16.5) < 1.0


def test_rank_metrics_are_the_originals_on_a_saturated_sigmoid():
    """In float32, sigmoid(20) == sigmoid(30) == 1.0: the original ranks such videos in video order, whatever the
    raw scores; strict_metrics ranks the raw score, ties against the text."""
    score = torch.tensor([[20., 30., 0.],    # own video (1) best raw, tied in sigmoid with the earlier video 0: 2
                          [30., 20., 0.],    # own video (0) tied with the later video 1: 1
                          [1., 1., 1.],      # exact raw tie, own video last: 3
                          [0., 5., -3.]])    # plain: own video (2) last, 3
    true_video = torch.tensor([1, 0, 2, 2])
    assert torch.sigmoid(score[0, 0]) == torch.sigmoid(score[0, 1]) == 1.0
    res = eval_retrieval.rank_metrics(score, true_video)
    assert res['ranks'] == [2, 1, 3, 3] == original_ranks(score, true_video)[0]
    assert res['r1'] == 0.25 and res['r5'] == res['r10'] == 1.0 and res['median'] == 2
    assert eval_retrieval.strict_metrics(score, true_video)['ranks'] == [1, 1, 3, 3]


@pytest.mark.parametrize('n_txt, n_vid', [(60, 25), (25, 60), (10, 10), (1, 7)])
def test_rank_metrics_match_the_original_loop(n_txt, n_vid):
    """Random scores with ties (few distinct values, some of them saturating) on square and non-square matrices,
    several captions per video: the same ranks as the original's sort, and R@k to the last bit (the original adds
    1/n once per hit: 3 hits of 10 give 0.30000000000000004, not 0.3)."""
    gen = torch.Generator().manual_seed(n_txt * 100 + n_vid)
    score = torch.tensor([-3., 0., 2., 18., 25.])[torch.randint(0, 5, (n_txt, n_vid), generator=gen)]
    true_video = torch.randint(0, n_vid, (n_txt,), generator=gen)
    res = eval_retrieval.rank_metrics(score, true_video)
    ranks, ref = original_ranks(score, true_video)
    assert res['ranks'] == ranks
    assert (res['r1'], res['r5'], res['r10']) == (ref['r@1'], ref['r@5'], ref['r@10'])
    assert res['median'] == int(np.median(ranks))
    score = torch.zeros(10, 10)
    score[torch.arange(10), (torch.arange(10) + (torch.arange(10) >= 3)) % 10] = 5.0  # texts 0-2 rank 1, the rest 2
    assert eval_retrieval.rank_metrics(score, torch.arange(10))['r1'] == 0.1 + 0.1 + 0.1 != 0.3


def test_strict_metrics_hand_made():
    score = torch.tensor([[3., 1., 2., 0.],            # own video (0) best: rank 1
                          [1., 1., 1., 0.],            # three-way tie: counted last among them, rank 3
                          [0., 5., 2., 2.],            # own video (3) tied with video 2, below video 1: rank 3
                          [math.nan, 0., 0., 1.],      # NaN own score: worst, rank 4
                          [0., 0., 0., 9.]])           # rank 1
    res = eval_retrieval.strict_metrics(score, torch.tensor([0, 1, 3, 0, 3]))
    assert res['ranks'] == [1, 3, 3, 4, 1]
    assert res['r1'] == pytest.approx(2 / 5) and res['r5'] == 1.0 and res['r10'] == 1.0
    assert res['median'] == 3 and res['mean'] == pytest.approx(12 / 5)


def brute_v2t(score, true_video):
    """The definition: a video's rank is its best caption's, 1 + captions of other videos scoring >= it."""
    ranks = []
    for v in range(score.shape[1]):
        own = [s for s, t in zip(score[:, v].tolist(), true_video.tolist()) if t == v and not math.isnan(s)]
        others = [s for s, t in zip(score[:, v].tolist(), true_video.tolist()) if t != v]
        best = max(own) if own else -math.inf
        ranks.append(1 + sum(1 for s in others if (not math.isnan(s) and s >= best) or (math.isnan(s) and not own)))
    return ranks


def test_v2t_every_caption_counts():
    score = torch.tensor([[3., 1., 2.],     # text 0 (video 0)
                          [0., 1., 5.],     # text 1 (video 0): worse than text 0 for video 0, best for video 2
                          [1., 4., 1.],     # text 2 (video 1)
                          [math.nan, 4., 3.]])  # text 3 (video 2): ties text 2 for video 1
    res = eval_retrieval.v2t_metrics(score, torch.tensor([0, 0, 1, 2]))
    # video 0: best own 3 (text 0), others 1, nan -> rank 1; video 1: own 4, text 3 ties -> 2;
    # video 2: own 3, texts 0 and 1 of video 0 score 2 and 5 -> rank 2
    assert res['ranks'] == [1, 2, 2] and res['r1'] == pytest.approx(1 / 3) and res['median'] == 2
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (50, 12), generator=gen).float()
    score[7, 2] = math.nan
    true_video = torch.arange(50) % 12
    assert eval_retrieval.v2t_metrics(score, true_video)['ranks'] == brute_v2t(score, true_video)


def test_median_rank_is_the_originals():
    """An even count with distinct middle ranks: the original's int(np.median(ranks)) = int((2 + 5) / 2) = 3,
    not the lower (2) or upper (5) middle rank; median_interp keeps 3.5."""
    score = torch.zeros(4, 6)
    for i, rank in enumerate([1, 2, 5, 6]):  # the true video (0) scores 1, rank - 1 others score 2
        score[i, 0], score[i, 1:rank] = 1.0, 2.0
    res = eval_retrieval.strict_metrics(score, torch.zeros(4, dtype=torch.long))
    assert res['ranks'] == [1, 2, 5, 6]
    assert res['median'] == 3 and type(res['median']) is int and res['median_interp'] == 3.5
    odd = eval_retrieval.strict_metrics(score[:3], torch.zeros(3, dtype=torch.long))  # ranks 1 2 5
    assert odd['median'] == 2 and odd['median_interp'] == 2.0


def test_strict_metrics_matches_definition_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (60, 25), generator=gen).float()  # 4 distinct values: ties everywhere
    score[5, 3] = math.nan
    true_video = torch.randint(0, 25, (60,), generator=gen)
    res = eval_retrieval.strict_metrics(score, true_video)
    ranks = brute_ranks(score, true_video)
    assert res['ranks'] == ranks
    assert res['r10'] == pytest.approx(sum(r <= 10 for r in ranks) / 60)
    assert res['median'] == int(sorted(ranks)[29] + sorted(ranks)[30]) // 2  # 60 ranks: the middle two, truncated


def test_precision_key():
    """fp32 (and auto) evaluate in plain float32, as the original, on CUDA too; bf16 / fp16 autocast."""
    import contextlib
    for dev in ('cpu', 'cuda'):
        for p in ('fp32', 'auto'):
            assert isinstance(eval_retrieval.autocast(torch.device(dev), p), contextlib.nullcontext)
    cast = eval_retrieval.autocast(torch.device('cpu'), 'bf16')
    assert isinstance(cast, torch.autocast) and cast.fast_dtype == torch.bfloat16
    assert eval_retrieval.autocast(torch.device('cpu'), 'fp16').fast_dtype == torch.float16
    # score_pairs honours it: bf16 = the model's own score under bf16 autocast, and differs from fp32
    mdl = small_model()
    gen = torch.Generator().manual_seed(2)
    feats = (torch.randn(3, 25, mdl.hidden_size, generator=gen), torch.ones(3, 25, dtype=torch.long),
             torch.randn(2, 16, mdl.hidden_size, generator=gen), torch.ones(2, 16, dtype=torch.long))
    with torch.no_grad():
        mdl.fc[-1].weight.normal_(0, 1, generator=gen)  # spread the scores
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ref = torch.stack([mdl.score(feats[0], feats[1], feats[2][t:t + 1].expand(3, -1, -1),
                                         feats[3][t:t + 1].expand(3, -1)) for t in range(2)])
    fp32 = eval_retrieval.score_pairs(mdl, *feats, size_pair=3)
    bf16 = eval_retrieval.score_pairs(mdl, *feats, size_pair=3, precision='bf16')
    assert torch.equal(bf16, ref) and not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.1)
    # a size_pair past the pairs there are: one block of them (it was padded to size_pair: 4 TB asked for here)
    assert torch.equal(eval_retrieval.score_pairs(mdl, *feats, size_pair=10**12), eval_retrieval.score_pairs(mdl, *feats, size_pair=6))


def small_model(cls=violet.VIOLET_Retrieval):
    torch.manual_seed(0)
    return cls(SMALL).eval()


def score_worker(rank, world, init_file, path_model, path_feat, path_out):
    """One rank of score_pairs under a gloo group (world 1: no group), 1 thread as every rank."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    mdl = violet.VIOLET_Retrieval(SMALL).eval()
    mdl.load_state_dict(torch.load(path_model))
    feats = torch.load(path_feat)
    score = eval_retrieval.score_pairs(mdl, *feats, size_pair=7, rank=rank, world=world)
    torch.save(score, f'{path_out}.{rank}')
    agent.leave_group()


def test_sharded_scores_equal_single_process(tmp_path):
    mdl = small_model()
    gen = torch.Generator().manual_seed(1)
    n_vid, n_txt, L_img, X, D = 5, 9, 5 * 5, 16, mdl.hidden_size  # 45 pairs in blocks of 7: ranks get 4 and 3
    mask_txt = (torch.arange(X) < torch.randint(3, X, (n_txt, 1), generator=gen)).long()
    feats = (torch.randn(n_vid, L_img, D, generator=gen), torch.ones(n_vid, L_img, dtype=torch.long),
             torch.randn(n_txt, X, D, generator=gen), mask_txt)
    torch.save(mdl.state_dict(), tmp_path / 'model.pt')
    torch.save(feats, tmp_path / 'feat.pt')
    out = {}
    threads = torch.get_num_threads()
    try:  # world 1 here, world 2 in two spawned processes
        score_worker(0, 1, '', str(tmp_path / 'model.pt'), str(tmp_path / 'feat.pt'), str(tmp_path / 'score1'))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(score_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'model.pt'), str(tmp_path / 'feat.pt'),
                                 str(tmp_path / 'score2')), nprocs=2)
    for world in (1, 2):
        out[world] = [torch.load(tmp_path / f'score{world}.{r}') for r in range(world)]
    assert out[1][0].shape == (n_txt, n_vid) and not out[1][0].isnan().any()
    for score in out[2]:  # every rank holds the whole matrix, bit for bit the single-process one
        assert torch.equal(score, out[1][0])
    # and the same numbers as scoring each pair alone in this process
    with torch.no_grad():
        ref = torch.stack([mdl.score(feats[0], feats[1], feats[2][t:t + 1].expand(n_vid, -1, -1),
                                     feats[3][t:t + 1].expand(n_vid, -1)) for t in range(n_txt)])
    assert torch.allclose(out[1][0], ref, atol=1e-5)
    true_video = torch.arange(n_txt) % n_vid
    assert (eval_retrieval.rank_metrics(out[2][1], true_video)['ranks'] ==
            eval_retrieval.rank_metrics(out[1][0], true_video)['ranks'])


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Toy corpus with 8 val / test videos; task toy-retrieval2 gives each of them a second caption."""
    out = str(tmp_path_factory.mktemp('toy'))
    make_toy.make_toy(out, seed=0, size_img=64, n_videos=2, n_val=2, n_images=2, n_down=4, n_down_eval=8, workers=2)
    with open(os.path.join(out, 'txt_toy-retrieval.json')) as f:
        one = json.load(f)
    two = {split: items + [dict(video=it['video'], caption='the ' + it['caption'].removeprefix('a ') + ' fast')
                           for it in items] for split, items in one.items()}
    with open(os.path.join(out, 'txt_toy-retrieval2.json'), 'w') as f:
        json.dump(two, f)
    args = dict(json.load(open(os.path.join(ROOT, '_data', 'toy', 'args_toy-retrieval.json'))), path_data=out,
                txt_backbone=SMALL['txt_backbone'], size_batch=4, num_workers=0, task='toy-retrieval2')
    config = os.path.join(out, 'args.json')
    with open(config, 'w') as f:
        json.dump(args, f)
    return out, config


def run_cli(argv, torchrun=False):
    """eval_retrieval.py -> its CompletedProcess. Without --ckpt: --ckpt '' (a random model, said on purpose: these
    tests check the evaluation's mechanics)."""
    argv = argv if '--ckpt' in argv else [*argv, '--ckpt', '']
    env = dict(os.environ, OMP_NUM_THREADS='1')  # same kernels in one or two processes
    launch = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] if torchrun else []
    p = subprocess.run([sys.executable, *launch, 'eval_retrieval.py', *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope='module')
def cli_single(toy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('eval1'))
    p = run_cli([toy[1], '--out', out])
    return json.load(open(os.path.join(out, 'eval_retrieval.json'))), out, p.stdout


def test_cli_end_to_end_writes_json(cli_single):
    res, out, stdout = cli_single
    assert os.path.isfile(os.path.join(out, 'args.json'))
    for split in ('val', 'test'):
        r = res[split]
        assert {'r1', 'r5', 'r10', 'median', 'mean', 'ranks', 'pairs_per_s'} <= set(r)
        assert 0 <= r['r1'] <= r['r5'] <= r['r10'] <= 1
        assert all(1 <= k <= r['n_video'] for k in r['ranks'])
        assert f'{split} t2v: R@1' in stdout and f'{split} v2t: R@1' in stdout
        # the original's line, print(split, res), with the same values
        assert f"\n{split} {{'r@1': {r['r1']!r}, 'r@5': {r['r5']!r}, 'r@10': {r['r10']!r}, 'median': {r['median']}}}\n" in stdout
        assert set(r['v2t']) >= {'r1', 'r5', 'r10', 'median', 'mean', 'ranks'} and len(r['v2t']['ranks']) == r['n_video']


def test_every_caption_ranked(cli_single):
    res = cli_single[0]
    for split in ('val', 'test'):
        assert res[split]['n_video'] == 8 and res[split]['n_text'] == 16 and len(res[split]['ranks']) == 16


def test_torchrun_two_ranks_same_ranks(toy, cli_single, tmp_path):
    run_cli([toy[1], '--out', str(tmp_path), '--splits', 'val'], torchrun=True)
    res = json.load(open(tmp_path / 'eval_retrieval.json'))
    assert res['run']['world'] == 2
    assert res['val']['ranks'] == cli_single[0]['val']['ranks']


def test_zero_shot_cli_scores_with_pretrain_vtm_head(toy, tmp_path):
    """--zero-shot: the pretraining checkpoint is loaded whole into the pretraining model (nothing unused, nothing
    missing) and every caption's rank is what the VTM head's scores, computed here pair by pair, give. The VT
    weights come from the checkpoint (path_vt points nowhere)."""
    args = json.load(open(toy[1]))
    torch.manual_seed(0)
    pre = violet.VIOLET_Pretrain(args).eval()
    with torch.no_grad():  # a head that spreads the scores: ranks without ties
        pre.fc[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    torch.save(pre.state_dict(), tmp_path / 'pre.pt')
    p = run_cli([toy[1], '--zero-shot', '--ckpt', str(tmp_path / 'pre.pt'), '--splits', 'val', '--out',
                 str(tmp_path / 'out'), '--set', f'path_vt={tmp_path}/absent.pt'])
    assert f'checkpoint {tmp_path}/pre.pt: 0 model keys not loaded, 0 unexpected keys' in p.stdout
    res = json.load(open(tmp_path / 'out' / 'eval_retrieval.json'))
    assert res['run']['zero_shot'] is True
    ds = dataset.Dataset_Retrieval(args, 'val')
    vids = list(dict.fromkeys(it['video'] for it in ds.txt))
    score = torch.zeros(len(ds.txt), len(vids))
    with torch.no_grad():
        feat_img = {v: pre.enc_img(ds.get_img(v)[None]) for v in vids}
        for t, it in enumerate(ds.txt):
            txt, mask = (torch.as_tensor(x)[None] for x in ds.str2txt(it['caption']))
            for j, v in enumerate(vids):
                out, _ = pre.go_cross(*feat_img[v], pre.enc_txt(txt), mask)
                score[t, j] = pre.fc(out[:, feat_img[v][0].shape[1]]).squeeze()
    assert len(set(score.flatten().tolist())) == score.numel()
    true_video = torch.tensor([vids.index(it['video']) for it in ds.txt])
    assert res['val']['ranks'] == original_ranks(score, true_video)[0]
    assert res['val']['strict']['ranks'] == brute_ranks(score, true_video)
    # without --zero-shot the same checkpoint fills the retrieval model (its VTM head scoring): the same ranks, and
    # the run says it was zero-shot (it recorded false)
    p = run_cli([toy[1], '--ckpt', str(tmp_path / 'pre.pt'), '--splits', 'val', '--out', str(tmp_path / 'out2'),
                 '--set', f'path_vt={tmp_path}/absent.pt'])
    res2 = json.load(open(tmp_path / 'out2' / 'eval_retrieval.json'))
    assert res2['run']['zero_shot'] is True and res2['val']['ranks'] == res['val']['ranks']


def test_pair_scoring_faster_than_bare_cross_encoder():
    """eval_retrieval's scoring (padding columns dropped, the last layer on the CLS row alone) against the original's
    way (every padded token, masked attention, the whole last layer): about 1.6x on the 2-layer toy model.
    One thread, timed in process CPU time, so that other jobs on the machine do not decide it."""
    import time
    import bench
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = bench.bench_pairs(small_model(), 64, 16, torch.device('cpu'), n_vid=16, n_txt=16, size_pair=64, reps=5,
                                clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    print(f"\npairs/s {res['pairs_per_s']:.0f}, bare {res['bare_pairs_per_s']:.0f}, ratio {res['ratio']:.2f}")
    assert res['ratio'] >= 1.25  # a regression to the original's work per pair reads about 1.0


def test_bench_cli_small(toy, tmp_path):
    """bench.py end to end on the small model (one task, tiny batch: the full run is in the README)."""
    out = tmp_path / 'bench.json'
    p = subprocess.run([sys.executable, 'bench.py', toy[1], '--set', 'size_batch=2', '--tasks', 'retrieval',
                        'pretrain', '--steps', '1', '--reps', '1', '--pair_items', '8', '--data', toy[1], '--data_items', '4',
                        '--frame_sizes', '320x240', '--frames', '2', '--out', str(out)],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out))
    assert set(res['train']) == {'retrieval', 'pretrain'}
    r = res['pretrain_vs_original']
    assert r['gflops_per_step'] < r['original_gflops_per_step']  # the heads at masked positions alone, the CLS row
    assert r['speedup'] == pytest.approx(r['samples_per_s'] / r['original_samples_per_s'])
    assert "pretraining step, fastest of 1 alternating: ours " in p.stdout
    for r in res['train'].values():
        assert r['samples_per_s'] > 0 and r['gflops_per_step'] > 0 and r['peak_mem_mb'] > 0
    assert res['eval_pairs']['ratio'] > 0 and res['data']['frames_per_s'] > 0
    r = res['decode_224']['320x240']
    assert r['ours'] > 0 and r['original_pil'] > 0 and r['speedup'] == r['ours'] / r['original_pil']
    assert r['speedup_fast_decode'] == r['ours_fast_decode'] / r['original_pil']
    assert "decode 320x240 -> 224 px, one worker: " in p.stdout


def test_bench_pixel_target_pretraining_has_no_original_way(tmp_path, monkeypatch):
    """With mvm_target pixel (VIOLETv2's, not the original's) bench.py still times our pretraining step and says why
    the comparison with the original's way is left out (it raised a ValueError from the original's-way step)."""
    import bench
    out = tmp_path / 'bench.json'
    monkeypatch.setattr(sys, 'argv', ['bench.py', os.path.join(ROOT, '_data', 'toy', 'args_pretrain.json'), '--tasks',
                                      'pretrain', '--set', 'mvm_target=pixel', 'size_batch=2', '--steps', '1',
                                      '--frame_sizes', '--data_items', '1', '--pair_items', '4', '--reps', '1',
                                      '--out', str(out)])
    bench.main()
    res = json.load(open(out))
    assert res['train']['pretrain']['samples_per_s'] > 0
    assert res['pretrain_vs_original'] == {'skipped': 'mvm_target pixel: the original has VQ targets only'}


def test_bench_train_times_the_loops_own_step(monkeypatch):
    """bench_train runs Trainer.train_step itself (the training loop's step), not a copy of it: every warm-up,
    counted and timed step goes through it, each one an optimiser step that moves the weights."""
    import agent
    import bench
    calls, real = [], agent.Trainer.train_step

    def counted(self, batch, gen, last_of_window=True):
        before = next(self.raw.fc.parameters()).detach().clone()
        r = real(self, batch, gen, last_of_window)
        calls.append(r['stepped'] and not torch.equal(before, next(self.raw.fc.parameters())))
        return r
    monkeypatch.setattr(agent.Trainer, 'train_step', counted)
    args = agent.load_args(os.path.join(ROOT, '_data', 'toy', 'args_toy-qamc.json'),
                           [f"txt_backbone={SMALL['txt_backbone']}", 'size_batch=2'])
    res = bench.bench_train('qamc', args, torch.device('cpu'), 2, None)
    assert calls == [True] * 5 and res['batch'] == 2 and res['samples_per_s'] > 0


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_bench_original_way_pretraining_step_equals_ours(train):
    """bench.py's stand-in for the original's pretraining step (its window attention, transformers' BERT encoder with
    the additive mask, heads at every position, VTM through the whole CT) computes the same losses and hits as ours
    on the same weights, masks and VTM pairs, and the same gradients (the toy model has no dropout): what it times
    is the original's work for our step."""
    import agent
    import bench
    import main_pretrain
    args = agent.load_args(os.path.join(ROOT, '_data', 'toy', 'args_pretrain.json'), ['size_batch=3', 'size_img=96'])
    args = {**args, 'path_ckpt': ''}
    ours, original = main_pretrain.Pretrain(args), bench.PretrainOriginalWay(args)
    torch.manual_seed(0)
    m_ours = ours.build_model().train(train)
    torch.manual_seed(0)
    m_orig = original.build_model().train(train)
    batch = bench.synthetic_batch('pretrain', args, 3, torch.Generator().manual_seed(0))
    batch[0] = torch.rand(3, 3, 3, 96, 64, generator=torch.Generator().manual_seed(1))  # non-square: windows padded
    batch[3] = batch[3].view(3, 3, -1)[:, :, :1 + 6].flatten(1)  # 3x2 patches a frame
    res = []
    for task, m in ((ours, m_ours), (original, m_orig)):
        torch.manual_seed(5)  # vtm_pairs draws from the global generator
        loss, losses, hits = task.step(m, batch, torch.Generator().manual_seed(3))
        loss.backward()
        res.append((loss, losses, hits, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (loss, losses, hits, grads), (loss_o, losses_o, hits_o, grads_o) = res
    assert losses_o.keys() == losses.keys() and all(bool(hits_o[k][1] > 0) for k in hits_o)
    for k in losses:
        assert torch.allclose(losses[k], losses_o[k], atol=1e-5, rtol=1e-5), (k, losses[k], losses_o[k])
        assert [int(x) for x in hits[k]] == [int(x) for x in hits_o[k]], k
    assert grads.keys() == grads_o.keys()
    for k in grads:
        assert torch.allclose(grads[k], grads_o[k], atol=1e-5, rtol=1e-4), (k, (grads[k] - grads_o[k]).abs().max())


def test_weights_to_score_must_be_named(toy, tmp_path, monkeypatch):
    """A training run's args.json without --ckpt scored the weights the run started from (its path_ckpt: the
    pretraining checkpoint, zero-shot) and wrote into the run's folder, exit 0; a config whose path_ckpt is "" scored a
    random model. Both are refused, saying what to give; --ckpt '' asks for the random model on purpose."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'args.json').write_text(json.dumps({**json.load(open(toy[1])), 'path_ckpt': 'pre/ckpt_violet_pretrain_0.pt'}))
    for epoch in (1, 2):
        torch.save({}, run / f'ckpt_violet_toy-retrieval2_{epoch}.pt')
        os.utime(run / f'ckpt_violet_toy-retrieval2_{epoch}.pt', (epoch, epoch))
    for config, said in (
            (run / 'args.json', f'eval_retrieval: {run}/args.json is a training run\'s args.json: its path_ckpt '
                                f'("pre/ckpt_violet_pretrain_0.pt") is what the run started from; name the weights to '
                                f'score: --ckpt CKPT (the run\'s newest: {run}/ckpt_violet_toy-retrieval2_2.pt)'),
            (toy[1], f'eval_retrieval: no checkpoint (path_ckpt is "" in {toy[1]}): give --ckpt CKPT; --ckpt "" scores '
                     f'a randomly initialised model (a chance-level baseline)')):
        monkeypatch.setattr(sys, 'argv', ['eval_retrieval.py', str(config), '--out', str(tmp_path / 'out')])
        with pytest.raises(SystemExit) as e:
            eval_retrieval.main()
        assert str(e.value) == said and not os.path.exists(tmp_path / 'out')
        assert sorted(os.listdir(run)) == ['args.json', 'ckpt_violet_toy-retrieval2_1.pt', 'ckpt_violet_toy-retrieval2_2.pt']
    # weights named by --set path_ckpt are named too: it goes on to read them (here an empty state dict, refused)
    monkeypatch.setattr(sys, 'argv', ['eval_retrieval.py', str(run / 'args.json'), '--set',
                                      f'path_ckpt={run}/ckpt_violet_toy-retrieval2_2.pt', '--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit, match=f'^eval_retrieval: {run}/ckpt_violet_toy-retrieval2_2.pt: an empty state dict$'):
        eval_retrieval.main()


def test_ctrl_c_is_one_line(toy, tmp_path, monkeypatch):
    """Ctrl-C during the scoring: one line, not a KeyboardInterrupt traceback; the --out folder it made is removed."""
    def pressed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_retrieval, 'evaluate', pressed)
    monkeypatch.setattr(sys, 'argv', ['eval_retrieval.py', toy[1], '--ckpt', '', '--splits', 'val', '--out',
                                      str(tmp_path / 'out')])
    with pytest.raises(SystemExit, match=r'^interrupted \(Ctrl-C\)$'):
        eval_retrieval.main()
    assert not os.path.exists(tmp_path / 'out')


def test_checkpoint_that_does_not_fit_is_refused(toy, tmp_path):
    """A checkpoint whose tensors all have another shape used to be 'loaded' (0 keys) and the random model
    evaluated with exit 0; now it is an error naming the file, and nothing is written."""
    args = json.load(open(toy[1]))
    sd = violet.VIOLET_Retrieval(args).state_dict()
    torch.save({k: torch.zeros(*v.shape, 2) for k, v in sd.items()}, tmp_path / 'wrong.pt')
    p = subprocess.run([sys.executable, 'eval_retrieval.py', toy[1], '--ckpt', str(tmp_path / 'wrong.pt'),
                        '--out', str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"eval_retrieval: {tmp_path / 'wrong.pt'}: none of the file's {len(sd)} keys fits the model (enc_img.emb_cls (")
    assert not os.path.exists(tmp_path / 'out')


def test_bench_gpu_train_part_survives_an_fp16_out_of_memory(tmp_path, monkeypatch):
    """fp16 may need more memory than the bf16 search found room for: its row was retried at the same batch, and a
    second out-of-memory error lost the part's remaining tasks. Now half the batch; None when that fails too."""
    import argparse
    import bench_gpu
    opt = argparse.Namespace(out=str(tmp_path), device='cpu', budget=100, peak_tflops=0, small=True, bert='unused',
                             tasks=['qamc', 'qaoe'], reserve=0, batch0=2)
    suite = bench_gpu.Suite(opt)
    monkeypatch.setattr(suite, 'largest_batch', lambda task: ((8, {}), 16))
    fp16_fits = {'qamc': 4, 'qaoe': 2}

    def train_once(task, b, precision, grad_ckpt=False):
        if precision == 'fp16' and b > fp16_fits[task]:
            raise torch.OutOfMemoryError('CUDA out of memory')
        return dict(batch=b, samples_per_s=1.0, peak_mem_mb=1.0)
    monkeypatch.setattr(suite, 'train_once', train_once)
    res = {}
    suite.part_train(res)
    assert res['qamc']['fp16']['batch'] == 4 and res['qaoe']['fp16'] is None
    assert res['qaoe']['bf16']['batch'] == 8 and res['qaoe']['bf16_grad_ckpt']['batch'] == 16


def test_bench_gpu_suite_small_on_cpu(tmp_path):
    """The one-shot device check runs end to end on the toy model (how it is tested before a GPU lease): every
    part writes its figures into bench_gpu.json, in order, within its time budget, and it leaves no temporary files."""
    tmp_dirs = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), 'bert-base-config-*')))
    before = tmp_dirs()
    p = subprocess.run([sys.executable, 'bench_gpu.py', '--device', 'cpu', '--small', '--out', str(tmp_path),
                        '--parts', 'parity', 'train', 'eval', 'data', 'original', '--tasks', 'qaoe', '--max_batch', '2',
                        '--steps', '1', '--workers', '1', '--data_frames', '4', '--frame_sizes', '320x240',
                        '--budget', '240'],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / 'bench_gpu.json'))
    assert 'skipped' in res['parity']  # golden outputs are full size only
    qaoe = res['train']['qaoe']
    assert qaoe['batch'] == 2 and qaoe['oom_at'] is None
    for name in ('bf16', 'fp16', 'bf16_grad_ckpt'):
        assert qaoe[name]['samples_per_s'] > 0 and qaoe[name]['gflops_per_step'] > 0
    pairs = res['eval']['bf16_64']
    assert pairs['finite'] and pairs['pairs_per_s'] > 0 and pairs['gflops_per_pair'] > 0
    assert res['eval']['msrvtt_1k_estimate_s_bf16'] > 0
    assert res['eval']['vs_bare_bf16']['ratio'] > 0
    probe = res['eval']['probe_bf16_weights']
    assert probe['pairs_per_s'] > 0 and 0 <= probe['bf16_weights_top10_overlap_vs_fp32'] <= 1
    assert 0 < probe['bf16_weights_max_abs_diff_vs_fp32'] < 1  # bf16 moves the scores, a little
    assert res['data']['320x240']['ours'] > 0 and res['data']['loader_1_workers_frames_per_s'] > 0
    for prec in ('fp16', 'bf16'):
        r = res['original'][prec]
        assert r['batch'] == 4 and r['original_gflops_per_step'] > r['gflops_per_step'] > 0 and r['speedup'] > 0
    assert (tmp_path / 'bench_gpu.log').read_text().count('\n') > 5
    assert tmp_dirs() == before  # its bert-base config directory is removed at exit


def test_failed_eval_leaves_no_empty_folder(toy, tmp_path):
    """An evaluation that stops (here: a split the texts do not have) removes the --out folder it made, which held
    only its lock; a folder that was there before stays."""
    for out, existed in ((tmp_path / 'new', False), (tmp_path / 'old', True)):
        if existed:
            out.mkdir()
        p = subprocess.run([sys.executable, 'eval_retrieval.py', toy[1], '--splits', 'nosuch', '--out', str(out), '--ckpt', ''],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and 'nosuch' in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
        assert out.exists() == existed


def test_eval_refuses_a_folder_in_use(toy, tmp_path):
    """--out held by a running job (its .lock flocked): refused before any scoring, naming the folder and the holder;
    nothing written there. Once released, the same command writes its results."""
    out = tmp_path / 'busy'
    out.mkdir()
    with open(out / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('pid 4242 on elsewhere\n')
        held.flush()
        p = subprocess.run([sys.executable, 'eval_retrieval.py', toy[1], '--splits', 'val', '--out', str(out), '--ckpt', ''],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and 'R@1' not in p.stdout
        assert p.stderr.strip().splitlines()[-1] == (f'eval_retrieval: {out} is in use by another run (pid 4242 on '
                                                     f'elsewhere); wait for it to end or choose another --out')
        assert os.listdir(out) == ['.lock']
    run_cli([toy[1], '--splits', 'val', '--out', str(out)])
    assert 'val' in json.load(open(out / 'eval_retrieval.json'))


def test_eval_into_a_run_folder_keeps_its_args(toy, tmp_path):
    """--out pointing at a training run's folder: the run's args.json stays, the evaluation's args go beside it."""
    (tmp_path / 'args.json').write_text('{"type": "retrieval", "lr": 0.5}')
    run_cli([toy[1], '--splits', 'val', '--out', str(tmp_path)])
    assert json.load(open(tmp_path / 'args.json')) == {'type': 'retrieval', 'lr': 0.5}
    assert json.load(open(tmp_path / 'eval_retrieval_args.json'))['type'] == 'retrieval'
    assert 'val' in json.load(open(tmp_path / 'eval_retrieval.json'))


def test_every_split_checked_before_scoring(toy, tmp_path):
    """An empty caption (or an unknown video) in test stopped the evaluation after val had been scored, with nothing
    written: every split's items are checked before the model is built."""
    txt = json.load(open(os.path.join(toy[0], 'txt_toy-retrieval.json')))
    txt['test'][1]['caption'] = ' '
    json.dump(txt, open(os.path.join(toy[0], 'txt_toy-emptycap.json'), 'w'))
    p = subprocess.run([sys.executable, 'eval_retrieval.py', toy[1], '--set', 'task=toy-emptycap', '--out', str(tmp_path / 'out'), '--ckpt', ''],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f'{toy[0]}/txt_toy-emptycap.json["test"][1] (video "{txt["test"][1]["video"]}"): "caption" is empty (only [CLS] '
        f'[SEP] would be left of it: no words to learn from or match)'), p.stderr[-2000:]
    assert 'val t2v' not in p.stdout and 'checkpoint' not in p.stdout and not os.path.exists(tmp_path / 'out')
