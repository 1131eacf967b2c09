"""Throughput of VIOLET on one device: training steps of every task (the scripts' own step code on synthetic
inputs of the config's shapes; pretraining also against the original's way: its arithmetic on the same weights),
retrieval pair scoring vs the bare cross-encoder (the original's way: every padded text token, masked attention),
frame decoding (the toy corpus per worker, and 224 px from photo-like JPEGs of several sizes against the original's
PIL path), peak memory and, on CUDA, model FLOP utilisation.

    python bench.py [CONFIG] [--set KEY=VALUE ...] [--device cpu|cuda] [--steps N]
    python bench.py                                   (toy model on CPU: _data/toy/args_pretrain.json)
    python bench.py _data/args_pretrain.json --device cuda --set path_vt=   (full size: bert-base-uncased from
        the HF cache, or txt_backbone=DIR holding its config.json; random VT)

Prints a short table, then the JSON (also written to --out when given).
"""
import argparse
import base64
import functools
import io
import json
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import agent
import dataset
import eval_retrieval
import main_pretrain
import main_qamc
import main_qaoe
import main_retrieval
import model as violet
import tasks

TASKS = {'pretrain': (main_pretrain.Pretrain, 4), 'qamc': (main_qamc.QAMC, 5), 'qaoe': (main_qaoe.QAOE, 5),
         'retrieval': (main_retrieval.Retrieval, 5)}  # task -> (script's Task, frames per video)
PEAK_TFLOPS_BF16 = [('H200', 989), ('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989), ('A100', 312)]  # dense


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_mem_mb(device):
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS so far (never reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_tflops(device, given):
    if given or device.type != 'cuda':
        return given or None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BF16 if k in name), None)


def random_text(shape, X, gen):
    """[CLS] random words [SEP] then padding, lengths uniform in X//2..X. -> (txt, mask) int64."""
    n = torch.randint(max(X // 2, 2), X + 1, shape, generator=gen)
    pos = torch.arange(X)
    txt = torch.randint(1000, 30000, (*shape, X), generator=gen)
    txt = torch.where(pos == 0, 101, torch.where(pos == n[..., None] - 1, 102, txt))
    txt = txt.masked_fill(pos >= n[..., None], 0)
    return txt, (txt != 0).long()


def synthetic_batch(name, args, T, gen):
    """One batch of the task's shapes, as its DataLoader would give it."""
    B, S, X = args['size_batch'], args['size_img'], args['size_txt']
    img = torch.rand(B, T, 3, S, S, generator=gen)
    if name == 'pretrain':
        hw = (S // 32) ** 2
        vq = torch.randint(0, violet.VQ_VOCAB, (B, T, hw), generator=gen)
        vq = torch.cat([torch.full((B, T, 1), -1), vq], 2).flatten(1)
        return [img, *random_text((B,), X, gen), vq]
    if name == 'qamc':
        O = args['size_option']
        return [img, *random_text((B, O), X, gen), torch.randint(0, O, (B,), generator=gen)]
    if name == 'qaoe':
        return [img, *random_text((B,), X, gen), torch.randint(0, args['size_vocab'], (B,), generator=gen)]
    return [img, *random_text((B,), X, gen)]


def train_setup(name, args, device, frames=None, task=None):
    """A Trainer for task `name` (task: another Task class for its batches, the original's way) and step(i), one
    agent.Trainer.train_step, the training loop's own step, on one synthetic batch. -> (trainer, step, frames)."""
    Task, T = TASKS[name]
    Task, T = task or Task, frames or T
    args = {**args, 'type': name, 'path_ckpt': '', 'dataset': args['dataset'] or 'bench',
            'task': args['task'] or 'bench', 'size_vocab': args['size_vocab'] or 1000}
    trainer = agent.Trainer(Task(args), device)
    trainer.model.train()
    batch = [x.to(device) for x in synthetic_batch(name, args, T, torch.Generator().manual_seed(0))]

    def step(i):
        trainer.train_step(batch, agent.generator(device, 0, 0, i, 0))
    return trainer, step, T


def warm_and_count(step, flops=None):
    """Two warm-up steps (allocator, autotuning, lazy inits), then the FLOPs of a third, counted on the eager model
    (or given, for a compiled one)."""
    for i in range(2):
        step(i)
    if flops is None:
        with FlopCounterMode(display=False) as counter:
            step(2)
        flops = counter.get_total_flops()
    return flops


def bench_train(name, args, device, steps, tflops, frames=None, flops=None):
    """samples/s of full training steps (forward incl. masking, backward, optimiser) of task `name`: the mean of
    `steps` timed steps after warm_and_count."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    trainer, step, T = train_setup(name, args, device, frames)
    flops = warm_and_count(step, flops)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    res = dict(samples_per_s=args['size_batch'] / sec, sec_per_step=sec, batch=args['size_batch'], frames=T,
               gflops_per_step=flops / 1e9, achieved_tflops=flops / sec / 1e12, precision=trainer.precision,
               peak_mem_mb=peak_mem_mb(device))
    if tflops:
        res['mfu'] = res['achieved_tflops'] / tflops
    del trainer
    return res


def bench_pretrain_vs_original(args, device, steps):
    """Our pretraining step against the original's way (PretrainOriginalWay: the original's arithmetic, same batch),
    both trainers alive, their timed steps alternating so that drifts of the machine hit both alike; the fastest
    step of each (single steps vary by 10-30 % on a small CPU machine, mostly page faults of fresh allocations)."""
    runs = {'ours': train_setup('pretrain', args, device), 'original': train_setup('pretrain', args, device,
                                                                                  task=PretrainOriginalWay)}
    flops = {k: warm_and_count(step) for k, (_, step, _) in runs.items()}
    best = dict.fromkeys(runs, float('inf'))
    for i in range(steps):
        for k, (_, step, _) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            step(3 + i)
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    B = args['size_batch']
    return dict(samples_per_s=B / best['ours'], original_samples_per_s=B / best['original'],
                speedup=best['original'] / best['ours'], gflops_per_step=flops['ours'] / 1e9,
                original_gflops_per_step=flops['original'] / 1e9, batch=B, frames=runs['ours'][2], steps=steps)


def original_window_attention(self, x, B, mask=None):
    """WindowAttention3D.forward as the original release computes it: explicit softmax per window and head, the
    bias gathered by indexing, the shift mask added through a [batch, windows, ...] view (no fused kernel)."""
    B_, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
    att = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index[:N, :N].reshape(-1)]
    att = att + bias.reshape(N, N, -1).permute(2, 0, 1)[None]
    if mask is not None:
        nW = mask.shape[0]
        att = (att.view(B_ // nW, nW, self.heads, N, N) + mask[None, :, None]).view(-1, self.heads, N, N)
    return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C))


def original_cross(mdl, feat_img, mask_img, feat_txt, mask_txt, attentions=False):
    """The original's go_cross: transformers' own BERT encoder (eager attention) on the whole [video ; text]
    sequence, every padded text token, the additive mask (1 - mask) * -10000 as transformers 4.18 built it.
    -> last hidden state (and, with attentions, the per-layer attention probabilities)."""
    additive = (1.0 - torch.cat([mask_img, mask_txt], 1)[:, None, None, :].to(feat_img.dtype)) * -10000.0
    att = []
    hooks = [layer.attention.self.register_forward_hook(lambda mod, args, out: att.append(out[1]))
             for layer in mdl.trsfr.layer] if attentions else []
    cfg = mdl.trsfr.layer[0].attention.self.config
    was, cfg._attn_implementation = cfg._attn_implementation, 'eager'
    try:
        out = mdl.trsfr(torch.cat([feat_img, feat_txt], 1), attention_mask=additive)[0]
    finally:
        cfg._attn_implementation = was
        for h in hooks:
            h.remove()
    return (out, att) if attentions else out


ORIGINAL_VQ_ONLY = 'the original has VQ targets only'


class PretrainOriginalWay(main_pretrain.Pretrain):
    """The original release's pretraining step, for a CPU comparison (the release itself runs on CUDA only): the
    same masking, weights and losses (tests/test_eval.py checks they are equal), but the original's arithmetic:
    its window attention, transformers' BERT encoder with the additive mask, the MLM / MVM heads at every
    position, and each VTM pair through the whole CT, padding included."""

    def build_model(self):
        mdl = super().build_model()
        for layer in mdl.enc_img.swin.layers:
            for blk in layer.blocks:
                blk.attn.forward = original_window_attention.__get__(blk.attn)
        return mdl

    def step(self, model, batch, gen):
        img, txt, mask, vq = batch
        raw = agent.unwrap(model)
        if raw.args['mvm_target'] != 'vq':
            raise ValueError(f'PretrainOriginalWay: {ORIGINAL_VQ_ONLY}')

        def get_att():
            with torch.no_grad():
                return raw.get_att(img, txt, mask)

        img_m, txt_m, ans_mtm, ans_mvm, _ = main_pretrain.mask_batch(img, txt, vq, gen, get_att)
        feat_img, mask_img, feat_txt, mask_txt = raw.go_feat(img_m, txt_m, mask)
        L_img, B = feat_img.shape[1], img.shape[0]
        out = original_cross(raw, feat_img, mask_img, feat_txt, mask_txt)
        i_img, i_txt = violet.vtm_pairs(B, min(B, violet.VTM_OPTIONS), img.device)
        fused = original_cross(raw, feat_img[i_img], mask_img[i_img], feat_txt[i_txt], mask_txt[i_txt])
        out_vtm = raw.fc(fused[:, L_img]).view(B, -1) / violet.VTM_TEMPERATURE
        ls_mtm, hit_mtm = tasks.ce_hits(raw.fc_mtm(out[:, L_img:]), ans_mtm)
        ls_mvm, hit_mvm = tasks.ce_hits(raw.fc_mvm(out[:, :L_img]), ans_mvm)
        ls_vtm, hit_vtm = tasks.ce_hits(out_vtm, torch.zeros(B, dtype=torch.long, device=img.device))
        return (ls_mtm + ls_mvm + ls_vtm, dict(mtm=ls_mtm, mvm=ls_mvm, vtm=ls_vtm),
                dict(mtm=hit_mtm, mvm=hit_mvm, vtm=hit_vtm))


@torch.no_grad()
def bench_pairs(mdl, size_img, size_txt, device, n_vid=16, n_txt=16, size_pair=64, reps=5, T=5, precision='fp32',
                clock=time.perf_counter):
    """eval_retrieval.score_pairs (features -> every (text, video) pair scored) vs the bare cross-encoder
    (go_cross + fc on one pre-stacked batch of size_pair pairs, run as many times), both in pairs/s.
    Interleaved repetitions, best of each, so background noise hits both alike (clock=time.process_time: the
    process's own CPU time, which other jobs on the machine disturb far less; CPU only)."""
    gen = torch.Generator().manual_seed(0)
    L_img, D = T * (1 + (size_img // 32) ** 2), mdl.hidden_size
    feat_img = torch.randn(n_vid, L_img, D, generator=gen).to(device)
    mask_img = torch.ones(n_vid, L_img, dtype=torch.long, device=device)
    feat_txt = torch.randn(n_txt, size_txt, D, generator=gen).to(device)
    mask_txt = random_text((n_txt,), size_txt, gen)[1].to(device)
    n_pair = n_vid * n_txt
    n_block = -(-n_pair // size_pair)
    v, t = torch.arange(size_pair, device=device) % n_vid, torch.arange(size_pair, device=device) // n_vid % n_txt
    stacked = (feat_img[v], mask_img[v], feat_txt[t], mask_txt[t])

    def bare():
        for _ in range(n_block):
            with eval_retrieval.autocast(device, precision):
                out, _ = mdl.go_cross(*stacked)
            mdl.fc(out[:, L_img].float())

    def pairs():
        eval_retrieval.score_pairs(mdl, feat_img, mask_img, feat_txt, mask_txt, size_pair, precision=precision)

    best = {'bare': float('inf'), 'pairs': float('inf')}
    for r in range(reps + 1):
        for name, fn in (('bare', bare), ('pairs', pairs)):
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if r > 0:  # the first round warms up
                best[name] = min(best[name], clock() - t0)
    res = dict(pairs_per_s=n_pair / best['pairs'], bare_pairs_per_s=n_block * size_pair / best['bare'],
               size_pair=size_pair, n_pair=n_pair, reps=reps)
    res['ratio'] = res['pairs_per_s'] / res['bare_pairs_per_s']
    return res


def bench_data(config, n_items, data_dir=''):
    """Frames decoded per second by one process (what each DataLoader worker delivers): get_img over n videos."""
    args = agent.load_args(config, [f'path_data={data_dir}'] if data_dir else [])
    try:
        ds = dataset.Dataset_Retrieval(args, 'train')
    except FileNotFoundError as e:
        return dict(skipped=f'{e} (make the toy corpus: python _tools/make_toy.py --out _data/toy)')
    vids = list(dict.fromkeys(item['video'] for item in ds.txt))[:n_items]
    ds.get_img(vids[0])  # warm-up (tokenizer, decoder libraries)
    t0 = time.perf_counter()
    n_frames = sum(ds.get_img(v).shape[0] for v in vids)
    sec = time.perf_counter() - t0
    return dict(frames_per_s=n_frames / sec, videos=len(vids), frames=n_frames, size_img=args['size_img'],
                config=config, path_data=args['path_data'])


def synthetic_frames(n, size, noise=4.0, quality=90):
    """n base64 JPEGs of w x h with photo-like content (smooth shading, edges, a little sensor noise: JPEG decoding
    time depends on it)."""
    w, h = (int(s) for s in size.split('x'))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / (20 + 5 * i) + i) [..., None] * np.cos(yy / 31.0)[..., None] * np.array([1, .8, .6])
        base[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2] += np.array([60, -40, 20])
        img = np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='JPEG', quality=quality)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def decode_rates(frames, reps=3):
    """Frames/s of one process decoding to 224 px: ours (default, and with fast_decode) vs the original's PIL path,
    interleaved, best of reps."""
    best = {}
    fast = functools.partial(dataset.b64_to_img, reduce=True)
    for _ in range(reps):
        for name, fn in (('ours', dataset.b64_to_img), ('ours_fast_decode', fast), ('original_pil', pil_reference)):
            t0 = time.perf_counter()
            for b in frames:
                fn(b, 224)
            best[name] = max(best.get(name, 0), len(frames) / (time.perf_counter() - t0))
    return dict(best, speedup=best['ours'] / best['original_pil'],
                speedup_fast_decode=best['ours_fast_decode'] / best['original_pil'])


def pil_reference(b64, size):
    """The original release's image path: PIL decode, pad to square, PIL bilinear resize, ToTensor."""
    import torchvision.transforms as T
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert('RGB')
    w, h = img.size
    img = T.Pad([0, (w - h) // 2] if w > h else [(h - w) // 2, 0])(img)
    return T.ToTensor()(img.resize((size, size), Image.BILINEAR))


def main():
    if sys.argv[1:3] == ['--suite', 'gpu']:  # the one-shot device check lives in bench_gpu.py
        import bench_gpu
        return bench_gpu.main(sys.argv[3:])
    p = argparse.ArgumentParser(description='VIOLET throughput benchmark (python bench.py --suite gpu ...: the '
                                            'one-shot device check, see bench_gpu.py)')
    p.add_argument('config', nargs='?', default='./_data/toy/args_pretrain.json',
                   help='model keys and shapes (size_img, size_txt, size_batch) to measure')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=3, help='timed training steps per task (after 3 untimed)')
    p.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    p.add_argument('--no_original', action='store_true',
                   help="skip the pretraining step the original's way (its arithmetic on the same weights)")
    p.add_argument('--size_pair', type=int, default=0, help='pairs per scoring batch (0: 512 CUDA, 64 CPU)')
    p.add_argument('--pair_items', type=int, default=0,
                   help='videos = texts in the pair benchmark (0: 64 on CUDA, 16 on CPU)')
    p.add_argument('--reps', type=int, default=5, help='repetitions of the pair benchmark (best is kept)')
    p.add_argument('--data', default='./_data/toy/args_toy-retrieval.json', help='config whose train split is decoded')
    p.add_argument('--data_dir', default='', help="decode this dir's files instead (names from the --data config)")
    p.add_argument('--data_items', type=int, default=32, help='videos decoded in the data benchmark')
    p.add_argument('--frame_sizes', nargs='*', default=['480x360', '640x480', '1280x720', '1920x1080'],
                   help="source frames W x H decoded to 224 px, against the original's PIL path (none: skip)")
    p.add_argument('--frames', type=int, default=16, help='synthetic JPEG frames per source size')
    p.add_argument('--peak_tflops', type=float, default=0, help='device peak (default: table for H100/H200/A100 bf16)')
    p.add_argument('--out', default='', help='also write the JSON here')
    opt = p.parse_args()

    args = agent.load_args(opt.config, opt.set)
    device = torch.device(opt.device)
    tflops = peak_tflops(device, opt.peak_tflops)
    cuda = device.type == 'cuda'
    res = dict(config=opt.config, set=opt.set, device=torch.cuda.get_device_name(device) if cuda else 'cpu',
               threads=torch.get_num_threads(), peak_tflops=tflops, train={})
    for name in opt.tasks:
        res['train'][name] = bench_train(name, args, device, opt.steps, tflops)
        print(f"train {name}: {res['train'][name]['samples_per_s']:.2f} samples/s", flush=True)
    if 'pretrain' in opt.tasks and not opt.no_original:
        if args['mvm_target'] != 'vq':
            res['pretrain_vs_original'] = dict(skipped=f"mvm_target {args['mvm_target']}: {ORIGINAL_VQ_ONLY}")
        else:
            r = res['pretrain_vs_original'] = bench_pretrain_vs_original(args, device, opt.steps)
            print(f"train pretrain vs the original's way: {r['speedup']:.2f}x", flush=True)

    agent.seed_all(0)
    mdl = violet.VIOLET_Retrieval(args).to(device).eval()
    size_pair = opt.size_pair or (512 if cuda else 64)
    n = opt.pair_items or (64 if cuda else 16)
    res['eval_pairs'] = bench_pairs(mdl, args['size_img'], args['size_txt'], device, n, n, size_pair, opt.reps,
                                    precision=args['precision'])
    del mdl
    res['data'] = bench_data(opt.data, opt.data_items, opt.data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker has
    res['decode_224'] = {size: decode_rates(synthetic_frames(opt.frames, size)) for size in opt.frame_sizes}
    torch.set_num_threads(threads)
    res['peak_mem_mb'] = peak_mem_mb(device)

    print(f"\n{'task':<10} {'samples/s':>10} {'s/step':>8} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} {'mem MB':>8}")
    for name, r in res['train'].items():
        mfu = f"{r['mfu'] * 100:5.1f}%" if 'mfu' in r else '     -'
        print(f"{name:<10} {r['samples_per_s']:10.2f} {r['sec_per_step']:8.3f} {r['gflops_per_step']:11.1f} "
              f"{r['achieved_tflops']:8.3f} {mfu:>6} {r['peak_mem_mb']:8.0f}")
    r = res.get('pretrain_vs_original', {})
    if 'skipped' in r:
        print(f"pretraining step against the original's way: skipped ({r['skipped']})")
    elif r:
        print(f"pretraining step, fastest of {r['steps']} alternating: ours {r['samples_per_s']:.2f} samples/s "
              f"({r['gflops_per_step']:.1f} GFLOP), the original's way {r['original_samples_per_s']:.2f} "
              f"({r['original_gflops_per_step']:.1f} GFLOP): {r['speedup']:.2f}x")
    e = res['eval_pairs']
    print(f"eval pairs: {e['pairs_per_s']:.0f} pairs/s vs bare cross-encoder {e['bare_pairs_per_s']:.0f} pairs/s "
          f"(ratio {e['ratio']:.2f}, {e['size_pair']} pairs per batch)")
    d = res['data']
    print(f"data: {d['frames_per_s']:.0f} frames/s per worker ({d['size_img']} px)" if 'frames_per_s' in d
          else f"data: skipped: {d['skipped']}")
    for size, r in res['decode_224'].items():
        print(f"decode {size} -> 224 px, one worker: {r['ours']:.0f} frames/s ({r['speedup']:.2f}x), with fast_decode "
              f"{r['ours_fast_decode']:.0f} ({r['speedup_fast_decode']:.2f}x); the original's PIL path {r['original_pil']:.0f}")
    print(json.dumps(res, indent=2))
    if opt.out:
        agent.save_json(res, opt.out)


if __name__ == '__main__':
    main()
