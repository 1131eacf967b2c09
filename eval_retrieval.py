"""Text-to-video retrieval evaluation (docs/violet.md#retrieval-metrics), fast and exact.

Every caption is ranked against every video of the split by the raw fc score of the fused CLS.
Features are computed once per unique video and once per caption; the N_text x N_video fusion then
runs as large batches of (video, text) pairs gathered on the device, sharded over torchrun ranks.

  python eval_retrieval.py _data/args_msrvtt-retrieval.json [--ckpt PATH] [--zero-shot] [--set k=v ...]
  (the weights: --ckpt, else the config's path_ckpt; --ckpt '' scores a random model on purpose)
  torchrun --nproc_per_node 4 eval_retrieval.py ...   (same numbers, split over the GPUs)

Precision: the config's `precision` key. 'fp32' (and 'auto') run everything in float32, as the original
evaluated; 'bf16' or 'fp16' autocast the encoders (the fast path on a GPU; the fc head stays in fp32).

Ranks are the original's: each text ranks the videos by the sigmoid of the score in float32, ties in video order
(its stable sort), so a saturated sigmoid (exactly 1.0 for confident pairs) ties videos the raw score tells
apart. `strict` holds the ranks by raw score with ties counted against the text. Writes eval_retrieval.json
(R@1/5/10 as fractions, summed as the original sums them, the original's median rank int(np.median(ranks)),
the interpolated median `median_interp`, mean rank, every caption's rank; the same under `strict` and `v2t`)
and args.json into --out, else the config's path_output, else _snapshot/_eval_retrieval_<timestamp>_<random>/.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import agent
import config
import dataset
import model as violet


def rank_metrics(score, true_video):
    """Text-to-video, as the original ranks. score [N_text, N_video] raw fc scores, true_video [N_text] index of
    each text's own video. Each text sorts the videos by sigmoid(score) in float32, descending, with Python's stable
    sort over the videos in order: rank = 1 + videos with a higher sigmoid + EARLIER videos with an equal one (the
    sigmoid saturates, so confident pairs tie). NaN is worst."""
    prob = torch.nan_to_num(sigmoid32(score), nan=-math.inf)
    true_video = true_video.long()[:, None]
    true = prob.gather(1, true_video)
    earlier = torch.arange(prob.shape[1])[None, :] < true_video
    return summarise(1 + ((prob > true) | ((prob == true) & earlier)).sum(1))


def sigmoid32(score):
    """The float32 sigmoid the original took on its GPU, 1 / (1 + exp(-x)), with the same value at every position of
    the matrix: torch.sigmoid on the CPU rounds the elements past the last full vector (its scalar tail) otherwise
    than the rest, which can split two videos of bit-equal scores that the original ties. exp is taken in float64 and
    rounded (the float32 exp, correctly rounded), the sum and the division in float32 (exact IEEE operations), so the
    sigmoid saturates to 1.0 where the original's does (x > 16.6)."""
    e = torch.exp(-score.double()).float()
    return 1 / (1 + e)


def strict_metrics(score, true_video):
    """Text-to-video on the raw score, ties against the text: rank = 1 + OTHER videos scoring >= the true one."""
    score = torch.nan_to_num(score.float(), nan=-math.inf)
    true = score.gather(1, true_video.long()[:, None])
    return summarise((score >= true).sum(1))  # counts the true video itself, hence the "1 +"


def v2t_metrics(score, true_video):
    """Video-to-text on the same scores: every caption of a video is a match of it, so a video's rank is that of
    its best-scoring caption, 1 + number of captions of OTHER videos scoring >= it (ties against us, NaN worst)."""
    score = torch.nan_to_num(score.float(), nan=-math.inf).t()  # [N_video, N_text]
    own = true_video.long()[None, :] == torch.arange(score.shape[0])[:, None]
    best = score.masked_fill(~own, -math.inf).max(1, keepdim=True).values
    return summarise(1 + ((score >= best) & ~own).sum(1))


def recall(ranks, k):
    """The fraction of ranks <= k, summed as the original does (1/n added once per hit), to the last bit."""
    frac = 0.0
    for _ in range(int((ranks <= k).sum())):
        frac += 1.0 / len(ranks)
    return frac


def summarise(ranks):
    """R@1/5/10 (fractions), median rank (the original's int(np.median(ranks)): an even count's middle two
    averaged, then truncated; median_interp keeps the average itself), mean rank, and every rank."""
    return dict(r1=recall(ranks, 1), r5=recall(ranks, 5), r10=recall(ranks, 10), median=int(np.median(ranks.numpy())),
                median_interp=float(np.median(ranks.numpy())), mean=ranks.double().mean().item(), ranks=ranks.tolist())


def autocast(device, precision='fp32'):
    """'bf16' / 'fp16': autocast (the fast path); 'fp32' and 'auto': plain float32, the original's numbers."""
    if precision in ('bf16', 'fp16'):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_pairs(model, feat_img, mask_img, feat_txt, mask_txt, size_pair=256, rank=0, world=1, progress=False,
                precision='fp32'):
    """Raw score of every (text, video) pair -> [N_text, N_video], identical on every rank.
    The flat pair space (text-major) is cut into blocks of size_pair; block b runs on rank b % world, so a
    block's batch is the same whatever the world size (sharded ranks == single-process ranks, bit for bit).
    The last block is filled up with repeats of the last pair: every batch has one size (a compiled CT then
    compiles once more, for the text lengths, and never for a batch size)."""
    n_txt, n_vid = feat_txt.shape[0], feat_img.shape[0]
    n_pair = n_txt * n_vid
    size_pair = min(size_pair, n_pair)  # (a block larger than every pair was padded to its size: memory for nothing)
    n_block = (n_pair + size_pair - 1) // size_pair
    mine = list(range(rank, n_block, world))
    per_rank = (n_block + world - 1) // world
    out = torch.full((per_rank, size_pair), math.nan, device=feat_img.device)
    for k, b in enumerate(tqdm(mine, disable=not progress, desc='pairs', unit='block')):
        idx = torch.arange(b * size_pair, (b + 1) * size_pair, device=feat_img.device).clamp_(max=n_pair - 1)
        t, v = idx // n_vid, idx % n_vid
        with autocast(feat_img.device, precision):  # the fc head itself stays in fp32 (model.score)
            out[k] = model.score(feat_img[v], mask_img[v], feat_txt[t], mask_txt[t])
    if world > 1:
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out)
        out = torch.stack(parts, 1)  # [per_rank, world, size_pair]: block k*world + r sits at [k, r]
    return out.reshape(-1)[:n_pair].reshape(n_txt, n_vid)


class Videos(torch.utils.data.Dataset):
    """Decoded frames of each unique video (decoding is the costly part, hence the DataLoader workers)."""
    def __init__(self, ds, vids):
        self.ds, self.vids = ds, vids

    def __len__(self):
        return len(self.vids)

    def __getitem__(self, i):
        return self.ds.get_img(self.vids[i])


def gather_rows(x, world):
    """all_gather equal-shaped shards and concatenate them along dim 0 (rank order)."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract(model, ds, args, device, rank=0, world=1, precision='fp32'):
    """Features of every unique video (sharded over ranks, then gathered) and of every caption.
    Returns feat_img, mask_img [N_video, ...], feat_txt, mask_txt [N_text, ...], true_video [N_text], vids."""
    items = [ds.item(i, 'video', 'caption') for i in range(len(ds))]  # a bad item is an error naming it
    vids = list(dict.fromkeys(item['video'] for item in items))  # unique, in order of first appearance
    chunk = (len(vids) + world - 1) // world
    padded = vids + vids[-1:] * (chunk * world - len(vids))  # equal shards for all_gather
    mine = Videos(ds, padded[rank * chunk:(rank + 1) * chunk])
    loader = torch.utils.data.DataLoader(mine, batch_size=args['size_batch'], num_workers=agent.loader_workers(args),
                                         pin_memory=device.type == 'cuda')
    feats, masks, failed = [], [], None
    for img in tqdm(agent.timed(loader, [0.0]), total=len(loader), disable=rank != 0, desc='videos', unit='batch'):
        if isinstance(img, Exception):  # a video this rank could not load: the others must not wait in the gather
            failed = img
            break
        with autocast(device, precision):
            f, m = model.enc_img(img.to(device, non_blocking=True))
        feats.append(f.float())
        masks.append(m)
    first_failed = agent.all_reduce([rank + 1 if failed is not None else 0], dist.ReduceOp.MAX if world > 1 else None)[0]
    if failed is not None:
        raise failed
    if first_failed:
        raise SystemExit(f'eval_retrieval: rank {int(first_failed) - 1} could not load its videos (its message says why)')
    feat_img, mask_img = torch.cat(feats), torch.cat(masks)
    if world > 1:
        feat_img, mask_img = gather_rows(feat_img, world)[:len(vids)], gather_rows(mask_img, world)[:len(vids)]

    # text features are one embedding lookup: every rank computes all of them
    txt, mask = zip(*[ds.str2txt(item['caption']) for item in items])
    txt, mask = torch.as_tensor(np.stack(txt), device=device), torch.as_tensor(np.stack(mask), device=device)
    feat_txt = []
    for i in range(0, len(txt), 1024):
        with autocast(device, precision):
            feat_txt.append(model.enc_txt(txt[i:i + 1024]).float())
    index = {vid: i for i, vid in enumerate(vids)}
    true_video = torch.as_tensor([index[item['video']] for item in items])
    return feat_img, mask_img, torch.cat(feat_txt), mask, true_video, vids


def evaluate(model, args, split, device, rank=0, world=1, size_pair=256, ds=None):
    """Rank every caption of `split` (of `ds` when given: its Dataset_Retrieval) against every video; returns the
    metrics dict (same on every rank)."""
    ds = ds or dataset.Dataset_Retrieval(args, split)
    if not ds.txt:
        raise SystemExit(f'{ds.path_txt}: split "{split}" has no captions')
    was_training = model.training
    model.eval()
    t0 = time.time()
    precision = args.get('precision', 'fp32')
    feat_img, mask_img, feat_txt, mask_txt, true_video, vids = extract(model, ds, args, device, rank, world, precision)
    t1 = time.time()
    score = score_pairs(model, feat_img, mask_img, feat_txt, mask_txt, size_pair, rank, world, progress=rank == 0,
                        precision=precision)
    t2 = time.time()
    model.train(was_training)
    res = rank_metrics(score.cpu(), true_video)
    res['strict'] = strict_metrics(score.cpu(), true_video)
    res['v2t'] = v2t_metrics(score.cpu(), true_video)
    res.update(split=split, precision=precision, n_text=len(ds.txt), n_video=len(vids), sec_feat=t1 - t0,
               sec_pair=t2 - t1, pairs_per_s=score.numel() / max(t2 - t1, 1e-9))
    return res


def report(split, res):
    """Three lines: the original's (print(split, res), its keys and values, for comparing with its logs), then
    text-to-video and video-to-text."""
    original = {'r@1': res['r1'], 'r@5': res['r5'], 'r@10': res['r10'], 'median': res['median']}
    line = lambda m: (f"R@1 {m['r1'] * 100:.1f}  R@5 {m['r5'] * 100:.1f}  R@10 {m['r10'] * 100:.1f}  "
                      f"MdR {m['median']:g}  MnR {m['mean']:.1f}")
    return (f"{split} {original}\n{split} t2v: {line(res)}  ({res['n_text']} texts x {res['n_video']} videos, "
            f"{res['pairs_per_s']:.0f} pairs/s)\n{split} v2t: {line(res['v2t'])}")


def named_weights(opt):
    """The config's args with the weights to score: a training run's args.json (its path_ckpt is where the run
    began) or a path_ckpt of "" needs --ckpt."""
    args = agent.load_args(opt.config, opt.set)
    named = opt.ckpt is not None or any(kv.partition('=')[0] == 'path_ckpt' for kv in opt.set)
    if not named:
        newest = violet.newest_ckpt(os.path.dirname(os.path.abspath(opt.config)))
        if os.path.basename(opt.config) == 'args.json' and newest:  # (it scored the weights the run started from)
            began = json.dumps(args['path_ckpt'])
            raise SystemExit(f"eval_retrieval: {opt.config} is a training run's args.json: its path_ckpt ({began}) is "
                             f"what the run started from; name the weights to score: --ckpt CKPT (the run's newest: "
                             f"{newest})")
        if not args['path_ckpt']:
            raise SystemExit(f'eval_retrieval: no checkpoint (path_ckpt is "" in {opt.config}): give --ckpt CKPT; '
                             f'--ckpt "" scores a randomly initialised model (a chance-level baseline)')
    elif opt.ckpt is not None:
        args['path_ckpt'] = opt.ckpt  # the model's VT may come from it (model.load_vt)
    return args


def read_splits(args, splits):
    """Every split's items first: an unknown video or an empty caption of test stopped the run after val was scored."""
    sets = {split: dataset.Dataset_Retrieval(args, split) for split in splits}
    for ds in sets.values():
        ds.check_items()
    return sets


def load_model(args, zero_shot):
    """-> (model, (keys not loaded, unexpected keys)): every model key from path_ckpt, or a one-line error."""
    try:
        model = (violet.VIOLET_Pretrain if zero_shot else violet.VIOLET_Retrieval)(args)
        return model, model.load_ckpt(args['path_ckpt'], 'all')
    except violet.CheckpointError as e:
        raise SystemExit(f'eval_retrieval: {e}') from e


@agent.data_errors_in_one_line
def main():
    parser = argparse.ArgumentParser(description='text-to-video retrieval evaluation (R@1/5/10, median/mean rank)')
    parser.add_argument('config', nargs='?', default='./_data/args_msrvtt-retrieval.json')
    parser.add_argument('--ckpt', default=None, help="checkpoint to score with (default: the config's path_ckpt; "
                                                     "'' scores a randomly initialised model)")
    parser.add_argument('--zero-shot', action='store_true', help='pretraining checkpoint scored with its VTM head: the zero-shot numbers')
    parser.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='override config keys (VALUE parsed as JSON when possible)')
    parser.add_argument('--splits', nargs='+', default=['val', 'test'], help="the txt json's splits ranked (default val test)")
    parser.add_argument('--size_pair', type=config.int_at_least(0), default=0,
                        help='(video, text) pairs per fused batch (0: 512 on CUDA, 64 on CPU)')
    parser.add_argument('--out', default='', help="output dir (default: the config's path_output, else _snapshot/_eval_retrieval_<timestamp>_<random>)")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)  # torchrun's LOCAL_RANK env wins
    opt = parser.parse_args()

    # the process group first: a check that fails on one node alone stops every rank (agent.agreed)
    rank, world, device = agent.init_dist(opt.local_rank)
    args = agent.agreed(named_weights, opt)
    agent.seed_all(args['seed'])  # same random init on every rank when no checkpoint is given
    sets = agent.agreed(read_splits, args, opt.splits)
    path_ckpt = args['path_ckpt']
    model, (not_loaded, unexpected) = agent.agreed(load_model, args, opt.zero_shot)
    if rank == 0:
        print(f'checkpoint {path_ckpt or "(none: random init)"}: {len(not_loaded)} model keys not loaded, '
              f'{len(unexpected)} unexpected keys')
        if args['skip_bad']:  # (a training config's key) the ranking needs every video of the split
            print('skip_bad does not apply here: every video and caption of a split is ranked, and a bad one stops '
                  'the evaluation, named', flush=True)
    model.to(device).eval()
    if args['compile']:
        model.compile_blocks()
    size_pair = opt.size_pair or (512 if device.type == 'cuda' else 64)
    # the output folder is taken before the work: one held by a running job is refused now, not after the scoring
    out = opt.out or args['path_output'] or agent.default_output('eval_retrieval')
    made = not os.path.exists(out)
    try:
        lock, out = agent.take_on_main(lambda: agent.lock_folder(out, '--out'), world, out)
    except SystemExit as e:
        raise SystemExit(f'eval_retrieval: {e}') from None

    results = {}
    try:
        for split in opt.splits:
            res = evaluate(model, args, split, device, rank, world, size_pair, sets[split])
            results[split] = res
            if rank == 0:
                print(report(split, res))
    except BaseException:
        if lock and made and os.listdir(out) == ['.lock']:  # a failed evaluation leaves no empty folder behind
            lock.close()
            shutil.rmtree(out)
        raise

    if rank == 0:
        # (a pretraining checkpoint fills the retrieval model too, its VTM head scoring: zero-shot, --zero-shot or not)
        zero_shot = opt.zero_shot or any(k.startswith('fc_mtm.') for k in unexpected)
        run = dict(config=opt.config, ckpt=path_ckpt, zero_shot=zero_shot, world=world, size_pair=size_pair,
                   precision=args['precision'])
        agent.save_json(dict(run=run, **results), os.path.join(out, 'eval_retrieval.json'))
        # a training run's folder keeps its own args.json: these args go beside it under another name
        has_args = os.path.exists(os.path.join(out, 'args.json'))
        agent.save_json(args, os.path.join(out, 'eval_retrieval_args.json' if has_args else 'args.json'))
        print(f'wrote {out}/eval_retrieval.json')
        lock.close()
    agent.leave_group()


if __name__ == '__main__':
    main()
