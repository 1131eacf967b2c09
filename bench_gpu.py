"""The one-shot device check: everything a short lease on one GPU should settle, in one run (about 6 minutes on an
H100), written to one JSON and a log as it goes (a run cut short still leaves what it measured).

    python bench_gpu.py --out $OUT                    (one CUDA GPU: full size, Swin-S + bert-base at 224 px)
    python bench_gpu.py --device cpu --small --out D  (the same code on the toy model: how it is tested)
    python bench.py --suite gpu ...                   (the same)

Parts, in order of importance (each is skipped when the time budget is spent):
  parity   the golden outputs of the original code at 224 px in fp32 on this device, and the bf16 / fp16 deviation
           from fp32 on the same inputs (max |diff| of the fused CLS and the heads, argmax agreement)
  train    full training steps of every task (the scripts' own step code): the largest batch that fits in bf16,
           then bf16 / fp16 / activation checkpointing; samples/s, MFU, peak memory
  eval     eval_retrieval's pair scoring in bf16 and fp32 (pairs/s, MFU) and an MSRVTT-sized evaluation (1,000 texts
           x 1,000 videos) extrapolated from a measured 100 x 1,000 slice plus the video features
  data     frame decoding (base64 JPEG -> 224 px tensor) per worker, DataLoaders of 4 / 8 / 16 workers against the
           measured training steps, and batched GPU JPEG decoding
  original the pretraining step against the original's way (bench.PretrainOriginalWay: its arithmetic, same weights
           and batch), alternating steps, in fp16 (the original's precision) and bf16
  compile  the training steps again with compile: true
No network and no pretrained weights: BERT is bert-base-uncased's config with random (or golden) weights.
"""
import argparse
import base64
import contextlib
import copy
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import agent
import bench
import dataset
import eval_retrieval
import model as violet

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {'pretrain': '_data/args_pretrain.json', 'qamc': '_data/args_tgif-action.json',
           'qaoe': '_data/args_msvd-qa.json', 'retrieval': '_data/args_msrvtt-retrieval.json'}
SMALL = dict(violet.PRESETS['toy'], txt_backbone=os.path.join(ROOT, '_data', 'bert-tiny'), size_img=64)  # toy model


class Budget(Exception):
    """This part ran out of its time."""


@contextlib.contextmanager
def time_limit(sec):
    """Raise Budget inside the block after sec seconds (compilation and OOM searches can take long)."""
    def handler(*_):
        raise Budget(f'over {sec:.0f} s')
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(sec, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Suite:
    def __init__(self, opt):
        self.opt, self.device = opt, torch.device(opt.device)
        self.t_end = time.time() + opt.budget
        self.cuda = self.device.type == 'cuda'
        self.tflops = bench.peak_tflops(self.device, opt.peak_tflops)
        os.makedirs(opt.out, exist_ok=True)
        self.res = dict(device=torch.cuda.get_device_name(self.device) if self.cuda else 'cpu',
                        torch=torch.__version__, date=time.strftime('%Y-%m-%d'), small=opt.small,
                        peak_tflops_bf16=self.tflops, budget_s=opt.budget)
        self.bert_dir = opt.bert or self.bert_config_dir()

    def left(self):
        return self.t_end - time.time()

    def log(self, *msg):
        line = ' '.join(str(m) for m in msg)
        print(line, flush=True)
        with open(os.path.join(self.opt.out, 'bench_gpu.log'), 'a', encoding='utf-8') as f:
            f.write(line + '\n')

    def save(self):
        agent.save_json(self.res, os.path.join(self.opt.out, 'bench_gpu.json'))

    def bert_config_dir(self):
        self.tmp = tempfile.TemporaryDirectory(prefix='bert-base-config-')  # removed at exit (mkdtemp left one a run)
        import transformers
        transformers.BertConfig().save_pretrained(self.tmp.name)  # bert-base-uncased's architecture, random weights
        return self.tmp.name

    def args(self, task, **over):
        args = agent.load_args(os.path.join(ROOT, CONFIGS[task]), [])
        args.update(txt_backbone=self.bert_dir, path_vt='', path_ckpt='', num_workers=0, dataset='bench',
                    task='bench', size_vocab=1000)
        if self.opt.small:
            args.update(SMALL, size_txt=16)
        args.update(over)
        return args

    def run(self):
        self.log(f"device {self.res['device']}, torch {torch.__version__}, budget {self.opt.budget:.0f} s")
        for part in self.opt.parts:
            if self.left() < 5:
                self.res[part] = dict(skipped='time budget spent')
                self.log(f'{part}: skipped (time budget spent)')
                continue
            t0 = time.time()
            self.res[part] = {}
            try:
                getattr(self, f'part_{part}')(self.res[part])  # fills it as it goes
            except Budget as e:  # a part that overran keeps what it measured
                self.res[part]['stopped'] = str(e)
            except Exception as e:  # one lease, many parts: a failing part is recorded and the others still run
                self.res[part].update(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-3000:])
                self.log(self.res[part]['traceback'])
            self.res[part]['sec'] = time.time() - t0
            self.log(f'{part}: {time.time() - t0:.0f} s')
            self.save()
        self.summary()
        self.save()

    # ---- parity: golden outputs at 224 px in fp32, and the half-precision deviation
    def golden_models(self):
        sys.path.insert(0, os.path.join(ROOT, 'tests'))
        import golden_weights as gw
        pre = gw.golden_state_dict('pretrain')
        models = {}
        for kind in ('pretrain', 'qamc', 'qaoe', 'retrieval'):
            sd = {n: pre[n] if n in pre and tuple(pre[n].shape) == shape else gw.formula(n, shape)
                  for n, shape, dtype in gw.read_keys(kind) if dtype == 'float32'}
            m = violet.MODELS[kind](dict(txt_backbone=self.bert_dir, path_vt='', size_vocab=1000))
            missing = [k for k in m.state_dict() if k not in sd and not k.endswith('relative_position_index')]
            assert not missing, missing[:5]
            m.load_state_dict(sd, strict=False)
            models[kind] = m.to(self.device).eval()
        return models, np.load(os.path.join(gw.HERE, 'g224.npz'))

    @torch.no_grad()
    def outputs(self, models, g, precision):
        dev = self.device
        img, txt, mask = (torch.from_numpy(g[k]).to(dev) for k in ('in_img', 'in_txt', 'in_mask'))
        qamc_txt = torch.from_numpy(g['qamc_txt']).to(dev)
        with autocast(dev, precision):
            pre = models['pretrain']
            fi, mi, ft, mt = pre.go_feat(img, txt, mask)
            cross, _ = pre.go_cross(fi, mi, ft, mt)
            mtm, mvm, vtm, _ = pre(img, txt, mask)
            out = dict(feat_img=fi, cross=cross, cls=cross[:, fi.shape[1]], att=pre.get_att(img, txt, mask),
                       mtm=mtm, mvm=mvm, vtm=vtm, qamc=models['qamc'](img, qamc_txt, (qamc_txt != 0).long()),
                       qaoe=models['qaoe'](img, txt, mask), retrieval=models['retrieval'](img, txt, mask)[0])
        return {k: v.float().cpu() for k, v in out.items()}

    def part_parity(self, res):
        if self.opt.small:
            res['skipped'] = '--small: the golden outputs are of the full-size model'
            return
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
        models, g = self.golden_models()
        fp32 = self.outputs(models, g, 'fp32')
        ref = dict(feat_img='feat_img', cross='cross', att='att', qamc='qamc', qaoe='qaoe', retrieval='retrieval',
                   vtm='vtm')
        err = {k: (fp32[k] - torch.from_numpy(g[r])).abs().max().item() for k, r in ref.items()}
        err['mtm_logsumexp'] = (fp32['mtm'].logsumexp(-1) - torch.from_numpy(g['mtm_logsumexp'])).abs().max().item()
        err['mvm_logsumexp'] = (fp32['mvm'].logsumexp(-1) - torch.from_numpy(g['mvm_logsumexp'])).abs().max().item()
        argmax_ok = all(torch.equal(fp32[k].argmax(-1), torch.from_numpy(g[f'{k}_argmax'])) for k in ('mtm', 'mvm'))
        tol = {k: 1e-3 if k in ('vtm', 'retrieval') else 1e-4 for k in err}  # the tests' tolerances
        res['fp32_vs_golden'] = dict(max_abs_err=err, argmax_equal=argmax_ok,
                                     ok=argmax_ok and all(err[k] < tol[k] for k in err))
        self.log(f"parity fp32 vs golden: ok={res['fp32_vs_golden']['ok']} max err {max(err.values()):.2e}")
        # as they were (torch's defaults: matmul off, cuDNN on): the later parts' fp32 is what eval_retrieval's fp32 is
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for prec in ('bf16', 'fp16'):
            half = self.outputs(models, g, prec)
            dev = {k: (half[k] - fp32[k]).abs().max().item() for k in ('cls', 'mtm', 'mvm', 'vtm', 'qamc', 'qaoe',
                                                                         'retrieval')}
            agree = {k: (half[k].argmax(-1) == fp32[k].argmax(-1)).float().mean().item()
                     for k in ('mtm', 'mvm', 'vtm', 'qamc', 'qaoe')}
            res[f'{prec}_vs_fp32'] = dict(max_abs_diff=dev, argmax_agreement=agree)
            self.log(f'parity {prec} vs fp32: max |diff| {dev} argmax agreement {agree}')
        del models
        self.free()
        return

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- training steps
    def train_once(self, task, batch, steps=None, flops=None, **over):
        args = self.args(task, size_batch=batch, **over)
        try:
            r = bench.bench_train(task, args, self.device, steps or self.opt.steps, self.tflops, frames=self.frames(task),
                                  flops=flops)
        finally:
            self.free()
        return r

    def frames(self, task):
        return 4 if task == 'pretrain' else 5

    def largest_batch(self, task, **over):
        """Double the batch from --batch0 while it fits (bf16); -> (batch, its result, the batch that failed)."""
        best, failed, b = None, None, self.opt.batch0
        while b <= self.opt.max_batch and self.left() > 20 + self.opt.reserve:
            try:
                r = self.train_once(task, b, steps=2, precision='bf16', **over)
            except torch.OutOfMemoryError:
                failed = b
                break
            best = (b, r)
            self.log(f"  {task} bf16 batch {b}: {r['samples_per_s']:.1f} samples/s, {r['peak_mem_mb']:.0f} MB")
            b *= 2
        self.free()
        return best, failed

    def part_train(self, res):
        for task in self.opt.tasks:
            if self.left() < 30 + self.opt.reserve:  # keep time for eval and data
                res[task] = dict(skipped='time budget spent')
                continue
            out = res[task] = {}
            found, failed = self.largest_batch(task)
            if found is None:
                out['error'] = f'batch {self.opt.batch0} does not fit'
                continue
            batch = out['batch'] = found[0]
            out['oom_at'] = failed
            for name, over in (('bf16', dict(precision='bf16')), ('fp16', dict(precision='fp16')),
                               ('bf16_grad_ckpt', dict(precision='bf16', grad_ckpt=True))):
                if self.left() < 20 + self.opt.reserve:
                    break
                b = batch * 2 if name.endswith('grad_ckpt') and failed else batch  # checkpointing fits more
                # (fp16 may need more memory than the bf16 search found room for: then half the batch)
                for size in dict.fromkeys(x for x in (b, batch, batch // 2) if x >= 1):
                    try:
                        out[name] = self.train_once(task, size, **over)
                        break
                    except torch.OutOfMemoryError:
                        out[name] = None
                        self.free()
                if out[name] is None:
                    self.log(f'train {task} {name}: out of memory down to batch {max(batch // 2, 1)}')
                    continue
                self.log(f'train {task} {name} batch {out[name]["batch"]}: {fmt_train(out[name])}')
            self.save()
        return

    def part_original(self, res):
        for prec in ('fp16', 'bf16'):
            if self.left() < 30:
                res[prec] = dict(skipped='time budget spent')
                continue
            args = self.args('pretrain', size_batch=self.opt.original_batch, precision=prec)
            try:
                with time_limit(self.left() - 10):
                    r = res[prec] = bench.bench_pretrain_vs_original(args, self.device, self.opt.steps)
            finally:
                self.free()
            self.log(f"original pretrain {prec} batch {r['batch']}: ours {r['samples_per_s']:.1f} samples/s, the "
                     f"original's way {r['original_samples_per_s']:.1f}: {r['speedup']:.2f}x")
            self.save()

    def part_compile(self, res):
        for task in self.opt.compile_tasks:
            eager = self.res.get('train', {}).get(task, {})
            batch = eager.get('batch', self.opt.compile_batch)
            flops = eager['bf16']['gflops_per_step'] * 1e9 if 'bf16' in eager else None
            if self.left() < 30:
                res[task] = dict(skipped='time budget spent')
                continue
            if flops is None:  # no eager measurement in this run: the baseline at the same batch first
                eager = res[f'{task}_eager'] = self.train_once(task, batch, precision='bf16')
                flops = eager['gflops_per_step'] * 1e9
                self.log(f'eager {task} batch {batch}: {fmt_train(eager)}')
            t0 = time.time()
            try:
                with time_limit(min(self.left() - 10, self.opt.compile_limit)):
                    r = self.train_once(task, batch, flops=flops, precision='bf16', compile=True)
                r['sec_total_incl_compile'] = time.time() - t0
                res[task] = r
                self.log(f'compile {task} batch {batch}: {fmt_train(r)} ({time.time() - t0:.0f} s incl. compile)')
            except (Budget, RuntimeError) as e:  # a compiler failure is a finding, not a crash of the suite
                res[task] = dict(error=f'{type(e).__name__}: {str(e)[:500]}', sec=time.time() - t0)
                self.log(f'compile {task}: {res[task]["error"]}')
            self.save()
        return

    # ---- where the time goes: the CUDA kernels of one eager training step and one pair-scoring block
    def part_profile(self, res):
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        sort = 'cuda_time_total' if self.cuda else 'cpu_time_total'
        task, batch = self.opt.profile_task, self.opt.compile_batch
        args = self.args(task, size_batch=batch, precision='bf16')
        trainer = agent.Trainer(bench.TASKS[task][0](args), self.device)
        data = [x.to(self.device) for x in bench.synthetic_batch(task, args, self.frames(task), torch.Generator().manual_seed(0))]
        for i in range(3):
            with profile(activities=acts) if i == 2 else contextlib.nullcontext() as prof:
                with trainer.autocast():
                    loss, _, _ = trainer.task.step(trainer.model, data, agent.generator(self.device, 0, 0, i, 0))
                trainer.scaler.scale(loss).backward()
                trainer.optimiser_step()
                trainer.optim.zero_grad(set_to_none=True)
                bench.sync(self.device)
        res[f'train_{task}_{batch}'] = prof.key_averages().table(sort_by=sort, row_limit=25)
        self.log(res[f'train_{task}_{batch}'])
        mdl = trainer.raw.eval()
        del trainer
        P, L_img, X = self.opt.size_pairs[-1], 5 * (1 + (args['size_img'] // 32) ** 2), 25
        fi = torch.randn(P, L_img, mdl.hidden_size, device=self.device)
        mi = torch.ones(P, L_img, dtype=torch.long, device=self.device)
        ft = torch.randn(P, X, mdl.hidden_size, device=self.device)
        mt = bench.random_text((P,), X, torch.Generator().manual_seed(0))[1].to(self.device)
        with torch.no_grad(), autocast(self.device, 'bf16'):
            for i in range(2):
                with profile(activities=acts) if i == 1 else contextlib.nullcontext() as prof:
                    mdl.score(fi, mi, ft, mt)
                    bench.sync(self.device)
        res[f'pairs_{P}'] = prof.key_averages().table(sort_by=sort, row_limit=20)
        self.log(res[f'pairs_{P}'])
        del mdl, fi, ft
        self.free()

    # ---- retrieval evaluation
    def part_eval(self, res):
        args = self.args('retrieval')
        agent.seed_all(0)
        mdl = violet.VIOLET_Retrieval(args).to(self.device).eval()
        n_vid, n_txt = (1000, self.opt.eval_texts) if not self.opt.small else (50, 10)
        T, S, X = 5, args['size_img'], args['size_txt']
        L_img, D = T * (1 + (S // 32) ** 2), mdl.hidden_size
        gen = torch.Generator().manual_seed(0)
        res.update(n_video=n_vid, n_text=n_txt, frames=T, size_txt=X)
        # video features of real frames through the video encoder: the other half of an evaluation's time
        n_feat = 64 if not self.opt.small else 8
        img = torch.rand(n_feat, T, 3, S, S, generator=gen).to(self.device)
        for prec in ('bf16', 'fp32'):
            with torch.no_grad(), autocast(self.device, prec):
                mdl.enc_img(img[:8])
                bench.sync(self.device)
                t0 = time.perf_counter()
                for i in range(0, n_feat, 16):
                    mdl.enc_img(img[i:i + 16])
                bench.sync(self.device)
            res[f'video_feat_per_s_{prec}'] = n_feat / (time.perf_counter() - t0)
        del img
        feat_img = torch.randn(n_vid, L_img, D, generator=gen).to(self.device)
        mask_img = torch.ones(n_vid, L_img, dtype=torch.long, device=self.device)
        feat_txt = torch.randn(n_txt, X, D, generator=gen).to(self.device)
        mask_txt = bench.random_text((n_txt,), X, gen)[1].to(self.device)
        for prec, sizes, n_t in (('bf16', self.opt.size_pairs, n_txt), ('fp32', self.opt.size_pairs[:1], n_txt // 10)):
            for size_pair in sizes:
                if self.left() < 20:
                    break
                r = self.pairs(mdl, feat_img, mask_img, feat_txt[:n_t], mask_txt[:n_t], size_pair, prec)
                res[f'{prec}_{size_pair}'] = r
                self.log(f"eval pairs {prec} size_pair {size_pair}: {r['pairs_per_s']:.0f} pairs/s"
                         + (f", MFU {r['mfu'] * 100:.1f}%" if 'mfu' in r else ''))
        if self.opt.eval_compile and self.left() > 30:
            size_pair = self.opt.size_pairs[-1]
            t0 = time.time()
            try:
                with time_limit(min(self.left() - 10, self.opt.compile_limit)):
                    mdl.compile_blocks()
                    r = res[f'bf16_compiled_{size_pair}'] = self.pairs(mdl, feat_img, mask_img, feat_txt, mask_txt,
                                                                         size_pair, 'bf16')
                r['sec_incl_compile'] = time.time() - t0
                self.log(f"eval pairs bf16 compiled size_pair {size_pair}: {r['pairs_per_s']:.0f} pairs/s"
                         + (f", MFU {r['mfu'] * 100:.1f}%" if 'mfu' in r else '') + f' ({time.time() - t0:.0f} s)')
            except (Budget, RuntimeError) as e:
                res['compiled'] = dict(error=f'{type(e).__name__}: {str(e)[:500]}', sec=time.time() - t0)
                self.log(f"eval compiled: {res['compiled']['error']}")
        if self.left() > 30:  # the exact levers (padding dropped, CLS-only last layer) against the original's way
            n = 8 if self.opt.small else 64
            res['vs_bare_bf16'] = r = bench.bench_pairs(mdl, S, X, self.device, n, n, self.opt.size_pairs[0], reps=2,
                                                        precision='bf16')
            self.log(f"eval pairs bf16 vs the bare masked cross-encoder: {r['pairs_per_s']:.0f} / "
                     f"{r['bare_pairs_per_s']:.0f} pairs/s ({r['ratio']:.2f}x)")
        if self.left() > 30:
            res['probe_bf16_weights'] = self.probe_bf16_weights(mdl, feat_img, mask_img, feat_txt, mask_txt)
        best = max((v for k, v in res.items() if k.startswith('bf16_')), key=lambda r: r['pairs_per_s'], default=None)
        if best:
            n_pairs = 1000 * 1000
            res['msrvtt_1k_estimate_s_bf16'] = n_pairs / best['pairs_per_s'] + 1000 / res['video_feat_per_s_bf16']
            self.log(f"MSRVTT 1k-A (1M pairs + 1000 videos) bf16 estimate: {res['msrvtt_1k_estimate_s_bf16']:.0f} s")
        del mdl, feat_img, feat_txt
        self.free()
        return

    def probe_bf16_weights(self, mdl, feat_img, mask_img, feat_txt, mask_txt):
        """Not an option yet, a measurement for deciding one: the CT with bf16 weights, so its residual stream,
        LayerNorms and GELUs run in bf16 too (autocast keeps them in fp32: about 40 % of a pair block's time in the
        profile). Pairs/s, and the scores' deviation from fp32 (and autocast bf16's) on 2 texts x all videos."""
        size_pair = self.opt.size_pairs[-1]
        m16 = copy.deepcopy(mdl).to(torch.bfloat16)
        m16.fc.float()  # the head stays fp32 (model.score)
        r = self.pairs(m16, feat_img.bfloat16(), mask_img, feat_txt.bfloat16(), mask_txt, size_pair, 'bf16')
        sub = (feat_img, mask_img, feat_txt[:2], mask_txt[:2])
        s32 = eval_retrieval.score_pairs(mdl, *sub, size_pair, precision='fp32')
        for name, s in (('bf16_weights', eval_retrieval.score_pairs(m16, sub[0].bfloat16(), sub[1], sub[2].bfloat16(),
                                                                    sub[3], size_pair, precision='bf16')),
                        ('autocast_bf16', eval_retrieval.score_pairs(mdl, *sub, size_pair, precision='bf16'))):
            r[f'{name}_max_abs_diff_vs_fp32'] = (s.float() - s32).abs().max().item()
            r[f'{name}_top10_overlap_vs_fp32'] = sum(
                len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) for a, b in zip(s.float(), s32)) / 20
        self.log(f"eval probe, CT in bf16 weights, size_pair {size_pair}: {r['pairs_per_s']:.0f} pairs/s"
                 + (f", MFU {r['mfu'] * 100:.1f}%" if 'mfu' in r else '')
                 + f"; max |score - fp32| {r['bf16_weights_max_abs_diff_vs_fp32']:.3g} (autocast bf16: "
                 f"{r['autocast_bf16_max_abs_diff_vs_fp32']:.3g})")
        del m16
        return r

    def pairs(self, mdl, feat_img, mask_img, feat_txt, mask_txt, size_pair, prec):
        L = feat_img.shape[1] + feat_txt.shape[1]
        with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(self.device, prec):
            mdl.score(feat_img[:1].expand(size_pair, -1, -1), mask_img[:1].expand(size_pair, -1),
                      feat_txt[:1].expand(size_pair, -1, -1), mask_txt[:1].expand(size_pair, -1))
        flops_per_pair = counter.get_total_flops() / size_pair
        score = lambda: eval_retrieval.score_pairs(mdl, feat_img, mask_img, feat_txt, mask_txt, size_pair,
                                                   precision=prec)
        score()  # warm-up
        bench.sync(self.device)
        t0 = time.perf_counter()
        s = score()
        bench.sync(self.device)
        sec = time.perf_counter() - t0
        n = s.numel()
        r = dict(pairs_per_s=n / sec, n_pairs=n, size_pair=size_pair, seq_len=L, gflops_per_pair=flops_per_pair / 1e9,
                 achieved_tflops=flops_per_pair * n / sec / 1e12, finite=bool(torch.isfinite(s).all()))
        if self.tflops:
            r['mfu'] = r['achieved_tflops'] / self.tflops
        return r

    # ---- data loading
    def part_data(self, res):
        torch.set_num_threads(1)  # what a DataLoader worker has
        for size in self.opt.frame_sizes:
            res[size] = r = bench.decode_rates(bench.synthetic_frames(self.opt.data_frames, size))
            self.log(f"data: source {size}: {r['ours']:.0f} frames/s per worker, {r['speedup']:.2f}x the original's "
                     f"PIL path ({r['original_pil']:.0f}); with fast_decode {r['ours_fast_decode']:.0f}")
        torch.set_num_threads(os.cpu_count() or 1)
        frames = bench.synthetic_frames(self.opt.data_frames, self.opt.frame_sizes[0])
        res['cpus'] = os.cpu_count()
        for workers in self.opt.workers:
            if self.left() < 15 or workers > (os.cpu_count() or 1):
                continue
            res[f'loader_{workers}_workers_frames_per_s'] = loader_rate(frames, workers, seconds=4)
            self.log(f"data: {workers} workers: {res[f'loader_{workers}_workers_frames_per_s']:.0f} frames/s")
        need = {}
        for task, r in self.res.get('train', {}).items():
            if isinstance(r, dict) and 'bf16' in r:
                need[task] = r['bf16']['samples_per_s'] * self.frames(task)
        res['frames_per_s_needed_by_bf16_steps'] = need
        res['keeps_up'] = {f'{w}_workers': {t: res[f'loader_{w}_workers_frames_per_s'] >= n for t, n in need.items()}
                           for w in self.opt.workers if f'loader_{w}_workers_frames_per_s' in res}
        if self.cuda:
            res.update(gpu_decode(frames, self.device))
            self.log(f"data: GPU decode+resize {res['gpu_decode_frames_per_s']:.0f} frames/s")
        return

    def summary(self):
        self.log('\n==== summary ====')
        p = self.res.get('parity', {})
        if 'fp32_vs_golden' in p:
            self.log(f"parity fp32 vs golden ok: {p['fp32_vs_golden']['ok']}; "
                     + '; '.join(f"{k}: max|d| cls {p[k]['max_abs_diff']['cls']:.3g}" for k in ('bf16_vs_fp32', 'fp16_vs_fp32') if k in p))
        for task, r in self.res.get('train', {}).items():
            for name in () if not isinstance(r, dict) else ('bf16', 'fp16', 'bf16_grad_ckpt'):
                if name in r:
                    self.log(f'train {task:<9} {name:<15} batch {r[name]["batch"]:>4}: {fmt_train(r[name])}')
        for prec, r in self.res.get('original', {}).items():
            if isinstance(r, dict) and 'speedup' in r:
                self.log(f"pretrain vs the original's way, {prec}: {r['speedup']:.2f}x")
        for task, r in self.res.get('compile', {}).items():
            if isinstance(r, dict):
                self.log(f'compile {task}: ' + (fmt_train(r) if 'samples_per_s' in r else str(r)))
        e = self.res.get('eval', {})
        for k, r in e.items():
            if isinstance(r, dict) and 'pairs_per_s' in r:
                self.log(f"eval {k}: {r['pairs_per_s']:.0f} pairs/s" + (f" MFU {r['mfu'] * 100:.1f}%" if 'mfu' in r else ''))
        if 'msrvtt_1k_estimate_s_bf16' in e:
            self.log(f"MSRVTT 1k-A estimate (bf16): {e['msrvtt_1k_estimate_s_bf16']:.0f} s")
        d = self.res.get('data', {})
        self.log('data: ' + json.dumps({k: v for k, v in d.items() if k != 'sec'}, default=str))


def fmt_train(r):
    s = f"{r['samples_per_s']:.1f} samples/s, {r['peak_mem_mb']:.0f} MB"
    return s + (f", MFU {r['mfu'] * 100:.1f}%" if 'mfu' in r else '')


def autocast(device, precision):
    if precision in ('bf16', 'fp16'):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)
    return contextlib.nullcontext()


class Frames(torch.utils.data.Dataset):
    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return 10 ** 7

    def __getitem__(self, i):
        return dataset.b64_to_img(self.frames[i % len(self.frames)], 224)


def loader_rate(frames, workers, seconds):
    """Frames/s delivered by a DataLoader of `workers` processes decoding at 224 px (batches of 16 frames)."""
    loader = torch.utils.data.DataLoader(Frames(frames), batch_size=16, num_workers=workers, prefetch_factor=4)
    it = iter(loader)
    for _ in range(workers * 2):  # workers started and warm
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it).shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def gpu_decode(frames, device):
    """Batched nvJPEG decode + resize + pad on the GPU (torchvision.io.decode_jpeg on CUDA), frames/s."""
    from torchvision.io import decode_jpeg
    import torchvision.transforms.v2.functional as TVF
    data = [torch.frombuffer(bytearray(base64.b64decode(b)), dtype=torch.uint8) for b in frames]

    def run():
        imgs = decode_jpeg(data, device=device)
        return [TVF.resize(i, [224, 224], antialias=True) for i in imgs]
    run()
    bench.sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    bench.sync(device)
    return dict(gpu_decode_frames_per_s=3 * len(data) / (time.perf_counter() - t0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.environ.get('OUT', '_snapshot/bench_gpu'), help='folder for the JSON and log')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--small', action='store_true', help='toy model, 64 px (to test this script on a CPU)')
    p.add_argument('--budget', type=float, default=400, help='seconds for all parts together')
    p.add_argument('--parts', nargs='+', default=['parity', 'train', 'eval', 'data', 'original', 'compile'],
                   choices=['parity', 'train', 'eval', 'data', 'original', 'compile', 'profile'])
    p.add_argument('--tasks', nargs='+', default=['pretrain', 'retrieval', 'qamc', 'qaoe'], choices=list(CONFIGS))
    p.add_argument('--reserve', type=float, default=100, help='seconds the train part leaves for the parts after it')
    p.add_argument('--compile_tasks', nargs='+', default=['pretrain', 'retrieval'], choices=list(CONFIGS))
    p.add_argument('--compile_limit', type=float, default=150, help='seconds for one compiled measurement')
    p.add_argument('--original_batch', type=int, default=32, help='batch of the pretraining step vs the original')
    p.add_argument('--compile_batch', type=int, default=32, help='batch of compile / profile when train did not run')
    p.add_argument('--eval_compile', action='store_true', help='also score pairs with compile_blocks()')
    p.add_argument('--eval_texts', type=int, default=20, help='texts x 1,000 videos scored per pair measurement')
    p.add_argument('--profile_task', default='qaoe', choices=list(CONFIGS))
    p.add_argument('--steps', type=int, default=3, help='timed steps per training measurement')
    p.add_argument('--batch0', type=int, default=16, help='first batch of the largest-batch search')
    p.add_argument('--max_batch', type=int, default=128)
    p.add_argument('--size_pairs', type=int, nargs='+', default=[512, 1024, 2048])
    p.add_argument('--workers', type=int, nargs='+', default=[4, 8, 16])
    p.add_argument('--data_frames', type=int, default=64)
    p.add_argument('--frame_sizes', nargs='+', default=['640x480', '1280x720'],
                   help='source frames W x H of the decoding benchmark (the first one feeds the DataLoaders)')
    p.add_argument('--bert', default='', help='a BERT dir (default: bert-base config, random weights)')
    p.add_argument('--peak_tflops', type=float, default=0)
    opt = p.parse_args(argv)
    if opt.small:
        opt.batch0, opt.max_batch, opt.size_pairs, opt.reserve = 2, min(opt.max_batch, 4), [64], min(opt.reserve, 30)
        opt.original_batch = min(opt.original_batch, 4)
    suite = Suite(opt)
    suite.run()
    return suite.res


if __name__ == '__main__':
    main()
