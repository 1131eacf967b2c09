"""VIOLET pretraining (docs/violet.md#masking, #losses): MLM + MVM + VTM with blockwise / attended masking.

    python main_pretrain.py [_data/args_pretrain.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_pretrain.py ...

Per epoch, for each dataset in args['datasets'], for each training part on disk: train, evaluate MLM / MVM / VTM
accuracy on the dataset's val split, save ckpt_violet_pretrain_<dataset>_<part>_<epoch>.pt.
mvm_target 'pixel' (VIOLETv2): MVM regresses the ImageNet-normalised RGB of each masked 32x32 patch of the
unmasked frame (L1 loss, mean over the 3*32*32 values, then over masked patches); its "accuracy" in the log is
the negative of that L1 loss (higher is better, like the others).
"""
import os

import torch
import torch.nn.functional as F
from einops import rearrange

import agent
import dataset
import model as violet
import tasks

P_MASK, ID_MASK, ID_SPECIAL = 0.15, 103, (101, 102, 0)  # [MASK]; [CLS], [SEP], [PAD] are never masked


def block_sides(high, shape, rand):
    """numpy randint(1, high) per element (high exclusive): uniform on 1..high-1; a side of 1 when high <= 1."""
    return 1 + (rand(*shape) * max(high - 1, 1)).long()


def blockwise(B, T, h, w, rand):
    """T random blocks per sample -> cov [B, T, h, w] bool: (frame, row, col) covered by any block."""
    inside = []
    for n, high in ((T, T), (h, h * 2 // 3), (w, w * 2 // 3)):  # frames, rows, cols
        side = block_sides(high, (B, T), rand)
        start = (rand(B, T) * (n - side + 1)).long()  # randint(0, n - side + 1)
        ar = torch.arange(n, device=side.device)
        inside.append((ar >= start[..., None]) & (ar < (start + side)[..., None]))  # [B, blocks, n]
    in_t, in_h, in_w = inside
    return (in_t[..., :, None, None] & in_h[..., None, :, None] & in_w[..., None, None, :]).any(dim=1)


def attended(att, special, n, gen):
    """Draw n positions per row without replacement, proportional to att (special positions zeroed); a row with
    fewer than n non-zero weights takes all of them; n = 0 (int(0.15 * L) under 7 positions, where the original's
    multinomial fails) draws none. -> picked [B, L] bool."""
    att = att.float().nan_to_num(0.0).clamp(min=0.0).masked_fill(special, 0.0)
    if n <= 0:
        return torch.zeros(att.shape, dtype=torch.bool, device=att.device)
    picked = att > 0
    enough = picked.sum(dim=1) >= n
    if enough.any():
        rows = enough.nonzero().squeeze(1)
        pos = torch.multinomial(att[rows], n, replacement=False, generator=gen)
        picked[rows] = torch.zeros_like(picked[rows]).scatter(1, pos, True)
    return picked


def mask_batch(img, txt, vq, gen, get_att, p_block=0.5):
    """The masking of docs/violet.md#masking, vectorised over the batch; per sample blockwise (prob p_block) or
    attended.
    img [B,T,3,H,W] in [0,1], txt [B,X], vq [B,T*(1+h*w)] (-1 at each frame's cls slot), gen a torch.Generator on
    img's device, get_att() -> [B, T*(1+h*w)+X] attention statistic of the unmasked inputs (called only when some
    sample draws attended masking).
    -> img with masked patches' 32x32 pixel blocks zeroed, txt with masked tokens 103, ans_mtm [B,X] (old id, -1
    elsewhere), ans_mvm [B,T*(1+h*w)] (VQ token, -1 elsewhere), is_mvm [B,T*(1+h*w)] bool."""
    B, T, _, H, W = img.shape
    X, h, w = txt.shape[1], H // 32, W // 32
    L_img = T * (1 + h * w)

    def rand(*shape):
        return torch.rand(shape, generator=gen, device=img.device)

    special_txt = (txt == ID_SPECIAL[0]) | (txt == ID_SPECIAL[1]) | (txt == ID_SPECIAL[2])
    is_block = rand(B) < p_block
    # blockwise: each ordinary text token w.p. 0.15; T video blocks
    mask_txt = (rand(B, X) < P_MASK) & ~special_txt
    cov = blockwise(B, T, h, w, rand)
    if not is_block.all():  # attended: int(0.15 * L) positions drawn over video patches and text tokens
        cls_slot = torch.zeros(T, 1 + h * w, dtype=torch.bool, device=img.device)
        cls_slot[:, 0] = True
        special = torch.cat([cls_slot.flatten().expand(B, -1), special_txt], dim=1)
        picked = attended(get_att(), special, int(P_MASK * (L_img + X)), gen)
        cov_att = picked[:, :L_img].view(B, T, 1 + h * w)[:, :, 1:].reshape(B, T, h, w)
        cov = torch.where(is_block[:, None, None, None], cov, cov_att)
        mask_txt = torch.where(is_block[:, None], mask_txt, picked[:, L_img:])

    ans_mtm = torch.where(mask_txt, txt, -1)
    txt = txt.masked_fill(mask_txt, ID_MASK)
    # patch (t, r, c) sits at sequence position t*(1+h*w) + 1 + r*w + c, after its frame's cls slot, as in the
    # original release (docs/violet.md#masking)
    is_mvm = F.pad(cov.flatten(2), (1, 0)).flatten(1)
    ans_mvm = torch.where(is_mvm, vq, -1)
    pixels = cov.repeat_interleave(32, dim=2).repeat_interleave(32, dim=3)  # [B, T, H, W]
    img = img.masked_fill(pixels[:, :, None], 0.0)  # in [0, 1], before the model's normalisation
    return img, txt, ans_mtm, ans_mvm, is_mvm


def pixel_targets(img):
    """Unmasked frames [B,T,3,H,W] in [0,1] -> [B, T*(1+h*w), 3*32*32]: the ImageNet-normalised RGB of each 32x32
    patch, flattened (channel, row, col), in the video token order (zeros at the cls slots)."""
    mean = img.new_tensor(violet.IMAGENET_MEAN).view(3, 1, 1)
    std = img.new_tensor(violet.IMAGENET_STD).view(3, 1, 1)
    x = rearrange((img - mean) / std, 'b t c (h p) (w q) -> b t (h w) (c p q)', p=32, q=32)
    return F.pad(x, (0, 0, 1, 0)).flatten(1, 2)


class Pretrain(tasks.Task):
    type = 'pretrain'
    losses = metrics = ('mtm', 'mvm', 'vtm')

    def __init__(self, args):
        super().__init__(args)
        twice = sorted({d for d in args['datasets'] if args['datasets'].count(d) > 1})
        if twice:  # its units would run twice an epoch, the second writing over the first's checkpoints
            raise agent.config_error(f"key 'datasets' names {', '.join(twice)} twice: {args['datasets']}")
        self.val = {}

    def build_model(self):
        return violet.VIOLET_Pretrain(self.args)

    def units(self):
        parts = {d: dataset.count_parts(self.args, d) for d in self.args['datasets']}
        for d, n in parts.items():
            if n == 0:
                raise SystemExit(f"no training parts img_{d}_train_0.tsv ... in {self.args['path_data']}")
        return [dict(epoch=e, dataset=d, part=p, name=f'ep {e} {d} part {p}')
                for e in range(1, self.args['size_epoch'] + 1) for d in self.args['datasets'] for p in range(parts[d])]

    def train_set(self, unit):
        return dataset.Dataset_Pretrain(self.args, unit['dataset'], 'train', unit['part'])

    def check_data(self):
        """Every file and split the run reads, before the first step, without loading the VQ tokens per part: the
        val split of each dataset (texts, VQ tokens, frames; kept for evaluation), its "train" texts and each
        part's frames and index; without skip_bad, each part's videos have a caption and VQ tokens."""
        first = {}
        for unit in self.units():
            first.setdefault(unit['dataset'], unit)
        for d, unit in first.items():
            self.eval_sets(unit)
            path_txt = os.path.join(self.args['path_data'], f'txt_{d}.json')
            captions = dataset.load_captions(path_txt, 'train')
            for p in range(dataset.count_parts(self.args, d)):
                path_index = os.path.join(self.args['path_data'], f'img_{d}_train_{p}.lineidx')
                tsv = dataset.TSV(os.path.join(self.args['path_data'], f'img_{d}_train_{p}.tsv'))
                lineidx = dataset.read_lineidx(path_index)
                tsv.check_index(lineidx, path_index)  # every line of the TSV indexed (its 32 spread lines if large)
                if not self.args['skip_bad']:  # files that do not go together stopped the run in their part
                    self.check_videos(tsv, lineidx, path_txt, captions, self.val[d])

    def unit_size(self, unit):  # (the part's lines, without loading its VQ tokens as its Dataset does)
        return len(dataset.read_lineidx(os.path.join(self.args['path_data'],
                                                     f"img_{unit['dataset']}_train_{unit['part']}.lineidx")))

    def check_eval_data(self):
        for d in self.args['datasets']:
            self.eval_sets(dict(dataset=d))

    @staticmethod
    def check_videos(tsv, lineidx, path_txt, captions, val):
        """32 videos spread over a part have a (non-empty) caption and (mvm_target 'vq') VQ tokens; the val set holds
        the dataset's VQ file. A sample, not every line: reading every line's id of a WebVid-size part would cost a
        random read per video at every start; a single missing entry is named when its sample is read."""
        for i in dataset.spread(range(len(lineidx))):
            offset = lineidx[i]
            vid, line = tsv.first_field(offset), f'{tsv.path} line {i} (offset {offset})'
            for where, has in ((f'{path_txt}["train"]: no caption', captions), (f'{val.path_vq}: no VQ tokens', val.vq)):
                if has is not None and vid not in has:
                    raise dataset.BadSample(f'{where} for video "{vid}" ({line})')
            dataset.first_caption(captions[vid], f'{path_txt}["train"]["{vid}"]', line, val.has_words)

    def eval_sets(self, unit):
        d = unit['dataset']
        if d not in self.val:
            self.val[d] = dataset.Dataset_Pretrain(self.args, d, 'val')
        return {'vl': self.val[d]}

    def evaluate_only(self, trainer):
        """--eval: MLM / MVM / VTM accuracy of the checkpoint on each dataset's val split, masked as the evaluation
        after every training part is (masks drawn from the seed)."""
        return {d: trainer.evaluate(0, f'{d} val', self.eval_sets(dict(dataset=d))['vl']) for d in self.args['datasets']}

    def step(self, model, batch, gen):
        img, txt, mask, vq = batch
        raw = agent.unwrap(model)

        def get_att():  # on the unmasked inputs, in the model's current mode (train: with dropout, as the original)
            with torch.no_grad():
                return raw.get_att(img, txt, mask)

        img_m, txt_m, ans_mtm, ans_mvm, is_mvm = mask_batch(img, txt, vq, gen, get_att)
        at_mtm = ans_mtm != -1
        # the MLM / MVM heads run on the masked positions alone (the only ones the losses read)
        out_mtm, out_mvm, out_vtm, ans_vtm = model(img_m, txt_m, mask, at_mtm, is_mvm)
        ls_mtm, hit_mtm = tasks.ce_hits(out_mtm, ans_mtm[at_mtm])
        ls_vtm, hit_vtm = tasks.ce_hits(out_vtm, ans_vtm)
        if self.args['mvm_target'] == 'pixel':
            err = (out_mvm.float() - pixel_targets(img)[is_mvm]).abs().mean(dim=-1)
            n = is_mvm.sum()
            ls_mvm = err.sum() / n.clamp(min=1)
            hit_mvm = (-err.sum(), n)  # "accuracy" = -L1
        else:
            ls_mvm, hit_mvm = tasks.ce_hits(out_mvm, ans_mvm[is_mvm])
        loss = ls_mtm + ls_mvm + ls_vtm
        # a batch without a masked word (or patch) adds 0 to the loss but NaN to the log, which leaves it out of the
        # unit's mean (agent.add_to), as the original's mean over no target was NaN and left out
        logged = dict(mtm=tasks.or_nan(ls_mtm, hit_mtm[1]), mvm=tasks.or_nan(ls_mvm, hit_mvm[1]), vtm=ls_vtm)
        return loss, logged, dict(mtm=hit_mtm, mvm=hit_mvm, vtm=hit_vtm)

    def new_log(self):  # (the original's key order)
        return {d: {f'{a}_{k}': [] for a in ('ls', 'ac') for k in ('vtm', 'mtm', 'mvm')} for d in self.args['datasets']}

    def log_keys(self):
        return tuple(self.args['datasets'])

    def curve_tag(self, unit, tag):  # each dataset its own curves (one line jumped between their accuracies)
        return f'{tag}/{unit["dataset"]}'

    def record(self, log, unit, losses, accs):
        for k in self.metrics:
            log[unit['dataset']][f'ls_{k}'].append(losses[k])
            log[unit['dataset']][f'ac_{k}'].append(accs['vl'][k])

    def ckpt_name(self, unit):
        if unit is None:
            return 'ckpt_violet_pretrain_0.pt'
        return f'ckpt_violet_pretrain_{unit["dataset"]}_{unit["part"]}_{unit["epoch"]}.pt'


if __name__ == '__main__':
    agent.main(Pretrain, './_data/args_pretrain.json')
