"""Pretraining: masking statistics (docs/violet.md#masking), learning on the toy corpus, a 2-process torchrun run,
and exact resume."""
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import types

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, '_tools'))
import agent  # noqa: E402
import dataset  # noqa: E402
import main_pretrain as mp  # noqa: E402
from make_toy import make_toy  # noqa: E402

TOY_CONFIG = os.path.join(REPO, '_data/toy/args_pretrain.json')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('toy'))
    make_toy(out, seed=0, n_videos=16, n_val=8, n_images=16, n_down=8, n_down_eval=4, workers=2)
    return out


def toy_sets(toy, extra=()):
    return ['--set', f'path_data={toy}', f'txt_backbone={REPO}/_data/bert-tiny', *extra]


def run(cmd, timeout=300):
    # one thread per process: on a shared 2-core machine OpenMP threads fighting for cores are several times slower
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, f'{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


# ---------------------------------------------------------------------------------------------- masking

def batch(B=400, T=4, S=224, X=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = w = S // 32
    img = torch.rand(B, T, 3, S, S, generator=g) * 0.9 + 0.1  # no zero pixel before masking
    txt = torch.randint(1000, 2000, (B, X), generator=g)
    n_words = torch.randint(3, X - 1, (B,), generator=g)
    ar = torch.arange(X)
    txt = torch.where(ar > n_words[:, None], 0, txt)  # [PAD]
    txt[:, 0] = 101
    txt.scatter_(1, n_words[:, None], 102)
    vq = torch.arange(T * (1 + h * w)).expand(B, -1).clone()  # the target at position p is p itself
    vq[:, ::1 + h * w] = -1
    return img, txt, vq


def never_called():
    raise AssertionError('get_att must not be called when every sample is blockwise')


def test_blockwise_text_ratio_and_specials():
    img, txt, vq = batch()
    special = (txt == 101) | (txt == 102) | (txt == 0)
    _, txt_m, ans_mtm, _, _ = mp.mask_batch(img, txt, vq, torch.Generator().manual_seed(1), never_called, p_block=1.0)
    masked = ans_mtm != -1
    assert not (masked & special).any()
    assert torch.equal(txt_m[masked], torch.full_like(txt_m[masked], 103)) and torch.equal(ans_mtm[masked], txt[masked])
    assert torch.equal(txt_m[~masked], txt[~masked])
    ratio = masked.sum() / (~special).sum()
    assert abs(ratio - 0.15) < 0.01, ratio


def test_block_sides_and_shapes():
    g = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.rand(shape, generator=g)
    assert set(mp.block_sides(4, (5000,), rand).tolist()) == {1, 2, 3}   # T = 4: t in [1, 3]
    assert set(mp.block_sides(7 * 2 // 3, (5000,), rand).tolist()) == {1, 2, 3}  # 224 px: h in [1, 3]
    assert set(mp.block_sides(1, (100,), rand).tolist()) == {1}          # T = 1, and 64 px (h*2//3 = 1)
    # one frame: one block, so the covered set is one rectangle with sides within [1, h*2//3 - 1]
    cov = mp.blockwise(3000, 1, 7, 7, rand)[:, 0]
    rows, cols = cov.any(2), cov.any(1)
    n_r, n_c = rows.sum(1), cols.sum(1)
    assert torch.equal(cov.sum((1, 2)), n_r * n_c)
    assert n_r.min() == 1 and n_r.max() == 3 and n_c.min() == 1 and n_c.max() == 3
    assert set(rows.float().argmax(1).tolist()) == set(range(7))  # first row: every start 0..6 occurs
    cov = mp.blockwise(2000, 4, 2, 2, rand)  # 64 px: blocks of 1 x 1 patch, 1..3 frames
    assert cov.sum((1, 2, 3)).max() <= 4 * 3 and cov.flatten(1).any(1).all()


def test_attended_count_specials_and_weights():
    img, txt, vq = batch(B=300, T=2)
    B, L_img = txt.shape[0], vq.shape[1]
    L = L_img + txt.shape[1]
    att = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) + 0.01
    att[:, L_img + 1] = 1e4  # the first word (never special): drawn almost always
    _, _, ans_mtm, ans_mvm, is_mvm = mp.mask_batch(img, txt, vq, torch.Generator().manual_seed(4), lambda: att, p_block=0.0)
    n = (ans_mtm != -1).sum(1) + is_mvm.sum(1)
    assert (n == int(0.15 * L)).all()
    assert not ((ans_mtm != -1) & ((txt == 101) | (txt == 102) | (txt == 0))).any()
    assert not is_mvm[:, ::1 + 7 * 7].any()  # video cls slots
    assert (ans_mtm[:, 1] != -1).float().mean() > 0.99
    # fewer non-zero weights than asked for: take all of them
    att = torch.zeros(B, L)
    att[:, [5, 7, L_img + 1]] = 1.0
    _, _, ans_mtm, _, is_mvm = mp.mask_batch(img, txt, vq, torch.Generator().manual_seed(5), lambda: att, p_block=0.0)
    assert is_mvm[:, [5, 7]].all() and is_mvm.sum() == 2 * B and (ans_mtm != -1).sum() == B
    # int(0.15 * L) = 0 (one 32 px frame, 2 video positions, 4 tokens): nothing is drawn, not every position
    img, vq = torch.rand(5, 1, 3, 32, 32) + 0.1, torch.tensor([[-1, 7]] * 5)
    txt = torch.tensor([[101, 1500, 1600, 102]] * 5)
    out_img, out_txt, ans_mtm, ans_mvm, is_mvm = mp.mask_batch(img, txt, vq, torch.Generator().manual_seed(6),
                                                               lambda: torch.ones(5, 6), p_block=0.0)
    assert torch.equal(out_img, img) and torch.equal(out_txt, txt)
    assert (ans_mtm == -1).all() and (ans_mvm == -1).all() and not is_mvm.any()


@pytest.mark.parametrize('p_block', [1.0, 0.0, 0.5])
def test_pixels_zeroed_exactly_at_masked_patches(p_block):
    T, S = 3, 224
    img, txt, vq = batch(B=40, T=T, S=S)
    h = w = S // 32
    att = torch.rand(40, vq.shape[1] + txt.shape[1], generator=torch.Generator().manual_seed(6))
    img_m, _, _, ans_mvm, is_mvm = mp.mask_batch(img, txt, vq, torch.Generator().manual_seed(7), lambda: att, p_block)
    assert is_mvm.any()
    # a 32x32 block is all zero in the masked image iff its patch is masked; other pixels unchanged
    zero = (img_m == 0).all(2).view(40, T, h, 32, w, 32).permute(0, 1, 2, 4, 3, 5).flatten(4).all(4)  # [B,T,h,w]
    untouched = (img_m == img).all(2).view(40, T, h, 32, w, 32).permute(0, 1, 2, 4, 3, 5).flatten(4).all(4)
    per_frame = is_mvm.view(40, T, 1 + h * w)
    assert not per_frame[:, :, 0].any()
    assert torch.equal(zero, per_frame[:, :, 1:].view(40, T, h, w)) and torch.equal(untouched, ~zero)
    # the target of patch (t, r, c) is the VQ token at t*(1+h*w) + 1 + r*w + c (vq[p] == p here)
    t, r, c = zero.nonzero()[:, 1:].unbind(1)
    b = zero.nonzero()[:, 0]
    assert torch.equal(ans_mvm[b, t * (1 + h * w) + 1 + r * w + c], t * (1 + h * w) + 1 + r * w + c)
    assert (ans_mvm != -1).sum() == zero.sum()


def test_pixel_targets():
    img = torch.rand(2, 2, 3, 64, 64)
    tgt = mp.pixel_targets(img)
    assert tgt.shape == (2, 2 * 5, 3 * 32 * 32)
    assert (tgt[:, 0] == 0).all() and (tgt[:, 5] == 0).all()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    patch = (img[1, 1, :, 32:64, 0:32] - mean[:, None, None]) / std[:, None, None]  # frame 1, row 1, col 0
    assert torch.allclose(tgt[1, 5 + 1 + 1 * 2 + 0], patch.flatten())


# ---------------------------------------------------------------------------------------------- training

def test_losses_go_down(toy):
    """A tiny direct loop through the Pretrain task on the toy images: MLM, MVM and VTM losses fall (VTM below
    its chance level ln 4: the model starts to match images and captions). It does not check where the MVM targets
    sit (it passes with them one slot early): test_pixels_zeroed_exactly_at_masked_patches does."""
    args = agent.load_args(TOY_CONFIG, toy_sets(toy)[1:] + ['size_txt=12'])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster
    torch.manual_seed(0)
    task = mp.Pretrain(args)
    model = task.build_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=1e-3)
    items = [d[i] for d in [dataset.Dataset_Pretrain(args, 'toyimg', 'train', p) for p in (0, 1)] for i in range(len(d))]
    hist = []
    for s in range(400):  # VTM sits at ln 4 for about 250 steps before it starts to match
        idx = torch.randperm(len(items), generator=torch.Generator().manual_seed(s))[:8]
        b, _ = dataset.collate_skip([items[i] for i in idx])
        loss, losses, _ = task.step(model, b, agent.generator('cpu', 0, s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append({k: v.item() for k, v in losses.items()})
    torch.set_num_threads(threads)
    for k in ('mtm', 'mvm', 'vtm'):  # (a batch without a masked word logs NaN for mtm: left out)
        first = np.nanmean([h[k] for h in hist[:20]])
        last = np.nanmean([h[k] for h in hist[-20:]])
        assert last < first * 0.85, (k, first, last)


def test_a_loss_without_targets_is_left_out_of_its_mean(toy):
    """A batch without any maskable word (only [CLS] [SEP]): no MLM target, so the MLM loss adds 0 to the loss
    trained and logs NaN; the trainer leaves it out of the MLM mean of the unit and of steps.jsonl, as the original
    left out its NaN (the mean of an empty cross-entropy), instead of averaging in a 0."""
    args = agent.load_args(TOY_CONFIG, toy_sets(toy)[1:])
    torch.manual_seed(0)
    task = mp.Pretrain(args)
    model = task.build_model().train()
    ds = dataset.Dataset_Pretrain(args, 'toyimg', 'train', 0)
    img, txt, mask, vq = dataset.collate_skip([ds[i] for i in range(4)])[0]
    txt = torch.zeros_like(txt)
    txt[:, 0], txt[:, 1] = 101, 102
    loss, losses, hits = task.step(model, [img, txt, (txt != 0).long(), vq], agent.generator('cpu', 0, 0))
    assert hits['mtm'][1] == 0 and torch.isnan(losses['mtm']) and torch.isfinite(loss)
    assert torch.allclose(loss, losses['mvm'] + losses['vtm'])
    fake = types.SimpleNamespace(local=agent.Trainer.fresh_local(None), task=task, args={'max_skip_frac': 0.01},
                                 log={'n_skipped': 0})
    window, bar = agent.new_window(), types.SimpleNamespace(set_postfix=lambda **_: None)
    for mtm, mvm in ((2.0, 1.0), (math.nan, 2.0), (4.0, 3.0)):
        values = dict(mtm=torch.tensor(mtm), mvm=torch.tensor(mvm), vtm=torch.tensor(1.0))
        agent.Trainer.add_losses(fake, torch.tensor(5.0), values, 4, window, bar)
    assert agent.Trainer.unit_losses(fake, 'unit', 12, 12, 1.0) == dict(mtm=3.0, mvm=2.0, vtm=1.0)
    assert {k: v / window['counts'][k] for k, v in window['sums'].items()} == dict(loss=5.0, mtm=3.0, mvm=2.0, vtm=1.0)


def test_torchrun_two_processes(toy, tmp_path):
    out = str(tmp_path / 'run')
    run(['torchrun', '--standalone', '--nproc_per_node=2', 'main_pretrain.py', TOY_CONFIG,
         *toy_sets(toy, [f'path_output={out}', 'size_epoch=1', 'size_batch=4', 'grad_accum=2', 'max_grad_norm=1.0'])])
    files = set(os.listdir(out))
    for d in ('toyvid', 'toyimg'):
        for p in (0, 1):
            ckpt = f'ckpt_violet_pretrain_{d}_{p}_1.pt'
            assert ckpt in files
    assert {'args.json', 'log.json', 'resume.pt', 'ckpt_violet_pretrain_0.pt'} <= files
    sd = torch.load(os.path.join(out, 'ckpt_violet_pretrain_toyimg_1_1.pt'), weights_only=True)
    assert 'fc_mtm.predictions.decoder.weight' in sd and not any(k.startswith('module.') for k in sd)
    # log.json as the original's: a dict of the datasets, each its six lists in the original's order; what this
    # project counts besides in log_extra.json
    with open(os.path.join(out, 'log.json')) as f:
        assert [(d, list(v)) for d, v in json.load(f).items()] == [
            (d, ['ls_vtm', 'ls_mtm', 'ls_mvm', 'ac_vtm', 'ac_mtm', 'ac_mvm']) for d in ('toyvid', 'toyimg')]
    with open(os.path.join(out, 'log_extra.json')) as f:
        assert list(json.load(f)) == ['n_skipped', 'n_nonfinite', 'n_overflow', 'not_loaded']
    log = agent.read_run_log(out)
    for d in ('toyvid', 'toyimg'):
        assert all(len(v) == 2 for v in log[d].values())
        assert all(0 <= a <= 1 for k, v in log[d].items() if k.startswith('ac') for a in v)
    assert log['n_skipped'] == 0 and log['n_nonfinite'] == 0
    assert json.load(open(os.path.join(out, 'args.json')))['path_output'] == out
    # steps.jsonl's evaluations are each dataset's own curves, as log.json's lists (one key for both jumped between
    # them), and plot_curves draws every one (it drew only the keys of every evaluation)
    evals = [r for r in map(json.loads, open(os.path.join(out, 'steps.jsonl'))) if 'eval' in r]
    for d in ('toyvid', 'toyimg'):
        for k in ('vtm', 'mtm', 'mvm'):
            assert [r['eval'][f'vl/{d}/{k}'] for r in evals if f'vl/{d}/{k}' in r['eval']] == pytest.approx(log[d][f'ac_{k}'])
    r = run([sys.executable, '_tools/plot_curves.py', out, '--out', str(tmp_path / 'c.svg')])
    drawn = re.findall(r'<!-- (vl/\S+) -->', (tmp_path / 'c.svg').read_text())
    assert sorted(drawn) == sorted(f'vl/{d}/{k}' for d in ('toyvid', 'toyimg') for k in ('vtm', 'mtm', 'mvm')), drawn


def test_resume_is_exact(toy, tmp_path):
    """Stopped inside the first part, then resumed: the same weights and log as a run never stopped."""
    common = [TOY_CONFIG, *toy_sets(toy, ['datasets=["toyimg"]', 'size_epoch=1', 'size_batch=8', 'save_every=1'])]
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    run([sys.executable, 'main_pretrain.py', *common, f'path_output={whole}'])
    r = run([sys.executable, 'main_pretrain.py', *common, f'path_output={parts}', 'stop_after_steps=1'])
    assert 'stopped after 1 steps' in r.stdout
    assert not os.path.exists(os.path.join(parts, 'ckpt_violet_pretrain_toyimg_0_1.pt'))
    assert torch.load(os.path.join(parts, 'resume.pt'), weights_only=True)['step'] == 1  # inside part 0 (2 steps)
    run([sys.executable, 'main_pretrain.py', '--resume', parts])  # the saved stop_after_steps=1 does not apply again
    names = sorted(f for f in os.listdir(whole) if f.startswith('ckpt_'))
    assert names == sorted(f for f in os.listdir(parts) if f.startswith('ckpt_')) and len(names) == 3
    for name in names:
        a = torch.load(os.path.join(whole, name), weights_only=True)
        b = torch.load(os.path.join(parts, name), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert agent.read_run_log(whole) == agent.read_run_log(parts)


def test_nonfinite_steps_are_skipped_then_stop(toy, tmp_path):
    out = str(tmp_path / 'nan')
    cmd = [sys.executable, 'main_pretrain.py', TOY_CONFIG,
           *toy_sets(toy, [f'path_output={out}', 'datasets=["toyimg"]', 'lr=1e30', 'max_nonfinite=2'])]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1
    assert 'non-finite loss at ep 1 toyimg part 0 step 1: step skipped (1 in a row, 1 in all)' in r.stdout
    assert r.stderr.strip().endswith('stopping: 2 consecutive non-finite losses (max_nonfinite=2) at ep 1 toyimg part 1 '
                                     'step 0; try precision bf16/fp32, a lower lr or max_grad_norm')
    assert agent.read_run_log(out)['n_nonfinite'] == 1  # as of the last finished part


def test_pixel_target_step(toy, tmp_path):
    """mvm_target 'pixel' on a corpus without any vq_*.pkl (the frame count comes from the frames). The MVM loss,
    from hand-made outputs, equals an independent computation: per masked patch (t, r, c), the L1 between the
    output at position t*(1+h*w) + 1 + r*w + c and the ImageNet-normalised RGB of that patch of the UNMASKED
    frame, mean over the 3*32*32 values, then over the masked patches; its 'accuracy' is minus that."""
    data = str(tmp_path / 'novq')
    shutil.copytree(toy, data)
    for d in ('toyvid', 'toyimg'):
        os.remove(os.path.join(data, f'vq_{d}.pkl'))
    args = agent.load_args(TOY_CONFIG, ['path_data=' + data] + toy_sets(toy)[2:] + ['mvm_target=pixel'])
    assert dataset.Dataset_Pretrain(args, 'toyimg', 'train', 0).size_frame == 1
    ds = dataset.Dataset_Pretrain(args, 'toyvid', 'val')
    assert ds.size_frame == 4
    b, _ = dataset.collate_skip([ds[i] for i in range(4)])
    img, txt, mask, vq = b
    B, T, h, w = 4, 4, 2, 2
    assert torch.equal(vq, torch.tensor([-1, 0, 0, 0, 0] * T).expand(B, -1))

    gen = torch.Generator().manual_seed(0)
    out_mvm = torch.randn(B, T * (1 + h * w), 3 * 32 * 32, generator=gen)
    att = torch.rand(B, T * (1 + h * w) + txt.shape[1], generator=gen)

    class Stub(torch.nn.Module):  # returns the hand-made outputs
        def get_att(self, img, txt, mask):
            return att

        def forward(self, img, txt, mask, at_mtm, at_mvm):  # the heads' outputs at the masked positions
            return torch.zeros(int(at_mtm.sum()), 30522), out_mvm[at_mvm], torch.zeros(B, 4), torch.zeros(B, dtype=torch.long)
    _, losses, hits = mp.Pretrain(args).step(Stub(), b, agent.generator('cpu', 0, 0))
    is_mvm = mp.mask_batch(img, txt, vq, agent.generator('cpu', 0, 0), lambda: att)[4]  # the same draw
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    errs = []
    for i, t, r, c in itertools.product(range(B), range(T), range(h), range(w)):
        p = t * (1 + h * w) + 1 + r * w + c
        if is_mvm[i, p]:
            target = (img[i, t, :, 32 * r:32 * r + 32, 32 * c:32 * c + 32] - mean) / std
            errs.append((out_mvm[i, p] - target.flatten()).abs().mean())
    assert len(errs) == is_mvm.sum() > 0
    assert torch.allclose(losses['mvm'], torch.stack(errs).mean(), atol=1e-6)
    assert hits['mvm'][1] == len(errs) and torch.allclose(hits['mvm'][0], -torch.stack(errs).sum(), atol=1e-4)
    # and the real model's step on that corpus
    torch.manual_seed(0)
    task = mp.Pretrain(args)
    model = task.build_model()
    loss, losses, _ = task.step(model, b, agent.generator('cpu', 0, 0))
    assert model.fc_mvm[-1].out_features == 3 * 32 * 32 and torch.isfinite(loss)


def test_log_json_in_the_originals_order_after_an_older_resume():
    """A log restored from a resume.pt of the previous version (its lists built as ls_mtm, ls_mvm, ...) is written in
    the original's order all the same (only the datasets were put in order)."""
    args = agent.load_args(TOY_CONFIG, [f'txt_backbone={REPO}/_data/bert-tiny'])
    task = mp.Pretrain(args)
    template = task.new_log()
    old = {d: {f'{a}_{k}': [0.5] for a in ('ls', 'ac') for k in ('mtm', 'mvm', 'vtm')} for d in args['datasets']}
    old['n_skipped'] = 0
    written = agent.in_order_of({d: template[d] for d in task.log_keys()}, old)
    assert [(d, list(v)) for d, v in written.items()] == [
        (d, ['ls_vtm', 'ls_mtm', 'ls_mvm', 'ac_vtm', 'ac_mtm', 'ac_mvm']) for d in args['datasets']]
    assert all(v == [0.5] for d in written.values() for v in d.values())
