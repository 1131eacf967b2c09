"""VIOLET: Video Swin (VT) + BERT embeddings (LE) + cross-modal BERT encoder (CT), and the task heads.

Parameter names follow the original release exactly, so its checkpoints load unchanged.
Shapes and quirks: docs/violet.md#architecture.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import safetensors
import safetensors.torch
import transformers
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_

import config

# named models, as timm names its variants: a config with "model_preset": "toy" needs none of these keys
PRESETS = {
    'toy': dict(txt_backbone='./_data/bert-tiny', path_vt='', vt_dim=16, vt_depths=[2, 2, 2, 2],
                vt_heads=[1, 2, 4, 8], vt_window=[8, 4, 4], vt_drop_path=0.0, head_dropout=0.0),
}


@dataclasses.dataclass
class ModelConfig:
    """The model's config keys (config.key: type, default, help; what values each takes)."""
    txt_backbone: str = config.key('bert-base-uncased', 'transformers model id or local directory for the text embedder, the cross-modal encoder and the MLM head (its tokenizer too, unless `txt_vocab`); a directory with only `config.json` builds that config with random weights (its tokenizer then comes from `txt_vocab`)')
    path_vt: str = config.key('./_snapshot/ckpt_video-swin.pt', 'Video Swin weights (`_tools/convert_video-swin.py`); `""`: random VT; a missing file is an error unless `path_ckpt` (or `eval_retrieval.py --ckpt`) holds every `enc_img.swin.*` weight')
    vt_dim: int = config.key(96, 'Video Swin width (Swin-S); when its output width differs from BERT\'s hidden size a Linear maps it', least=1)
    vt_depths: list[int] = config.key([2, 2, 18, 2], 'Video Swin blocks per stage', least=1, length=4)
    vt_heads: list[int] = config.key([3, 6, 12, 24], 'Video Swin attention heads per stage', least=1, length=4)
    vt_window: list[int] = config.key([8, 7, 7], 'Video Swin window (time, height, width)', least=1, length=3)
    vt_drop_path: float = config.key(0.2, 'stochastic depth of the VT, rising linearly over its blocks', least=0, most=1)
    grad_ckpt: bool = config.key(False, 'activation checkpointing in VT and CT (less memory, one recompute)')
    mvm_target: str = config.key('vq', '`vq`: DALL-E tokens from `vq_<dataset>.pkl`; `pixel`: L1 regression of the normalised RGB of each masked 32 x 32 patch of the unmasked frame (VIOLETv2), for data without VQ tokens: no `vq_*.pkl` is read, the frame count comes from the frames; its `mvm` evaluation number is then minus the mean L1 (higher is better), not an accuracy', choices=('vq', 'pixel'))
    head_dropout: float = config.key(0.1, 'dropout before each MLP head (the original\'s 0.1); the toy preset uses 0, since a tiny model trained from scratch cannot learn matching through that noise', least=0, most=1)
    model_preset: str = config.key('', 'a named model (`model.PRESETS`, as timm names its variants): its keys fill the model keys a config and `--set` leave out. `toy` (the toy configs\' model): `txt_backbone` `./_data/bert-tiny`, `path_vt` `""`, `vt_dim` 16, `vt_depths` [2,2,2,2], `vt_heads` [1,2,4,8], `vt_window` [8,4,4], `vt_drop_path` 0, `head_dropout` 0; a saved `args.json` holds them all written out', choices=('', *PRESETS))


DEFAULTS = config.defaults(ModelConfig)
VTM_TEMPERATURE = 0.05  # VTM and retrieval logits: score / 0.05
VTM_OPTIONS = 4  # pretraining VTM: each video against its own text and 3 others of the batch
VQ_VOCAB = 8192  # DALL-E's visual token vocabulary (the MVM classes)
MAX_FRAMES, MAX_SIDE = 6, 448  # emb_len has 6 rows, emb_pos 1+14*14
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def say(*msg):
    """print on the run's first process alone (a 32-process run would say each line 32 times): rank 0 of the process
    group, or before there is one, torchrun's RANK. A process that is alone (WORLD_SIZE unset or 1) speaks whatever
    RANK a cluster's environment left set."""
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:
        alone = os.environ.get('WORLD_SIZE', '1').strip() in ('1', '0', '')
        rank = '0' if alone else os.environ.get('RANK', '0')
    if str(rank).strip() in ('0', ''):  # (an empty RANK is no rank)
        print(*msg, flush=True)


def config_problem(args):
    """-> what is wrong between the model keys of a full args dict (a phrase naming the key), or None."""
    for i, heads in enumerate(args['vt_heads']):
        width = args['vt_dim'] * 2**i  # patch merging doubles the width at each stage
        if width % heads:
            return (f"key 'vt_heads' {args['vt_heads']} does not fit vt_dim {args['vt_dim']}: stage {i + 1} is "
                    f"{width} wide, which its {heads} heads do not divide")
    return None


def with_preset(given):
    """The keys of the preset `given` names, under the given keys themselves."""
    name = given.get('model_preset') or ''
    if name and name not in PRESETS:
        raise ValueError(f"model_preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return {**PRESETS.get(name, {}), **given}


def margs(args):
    return {**DEFAULTS, **with_preset({k: v for k, v in args.items() if v is not None})}


# ----------------------------------------------------------------------------------------------
# Video Swin, as VIOLET changed it (temporal stride 1, one appended frame)

def shrink_window(size, window, shift):
    """A window side not smaller than the input is shrunk to it, and its shift dropped."""
    window, shift = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return tuple(window), tuple(shift)


@functools.lru_cache(maxsize=64)
def shift_mask(D, H, W, window, shift, device):
    """-100 between tokens of different regions after the cyclic shift (the original's labelling,
    including its behaviour on an axis whose shift is 0)."""
    label, cnt = torch.zeros(D, H, W), 0
    for d in slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None):
        for h in slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None):
            for w in slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None):
                label[d, h, w] = cnt
                cnt += 1
    label = rearrange(label, '(d p) (h q) (w r) -> (d h w) (p q r)', p=window[0], q=window[1], r=window[2])
    diff = label[:, None, :] - label[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0).to(device)  # [nW, N, N]


class WindowAttention3D(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.heads = heads
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2*wd-1) * (2*wh-1) * (2*ww-1), heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel = (rel[..., 0] + wd-1) * (2*wh-1) * (2*ww-1) + (rel[..., 1] + wh-1) * (2*ww-1) + (rel[..., 2] + ww-1)
        self.register_buffer('relative_position_index', rel)  # persistent: part of the original state dict
        self.qkv = nn.Linear(dim, dim*3, bias=True)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, B, mask=None):
        """x: [B*nW, N, C] windows. The bias of an N-token window is the top-left N x N corner of the
        full window's index (the original's rule; exact only when time alone shrinks)."""
        _, N, C = x.shape
        # windows x heads form one 4-D "head" axis: SDPA's fused kernels take only 4-D inputs, and the bias then
        # broadcasts over the batch without being copied per sample
        q, k, v = rearrange(self.qkv(x), '(b n) t (three h d) -> three b (n h) t d', b=B, three=3, h=self.heads)
        idx = self.relative_position_index[:N, :N].reshape(-1)
        # index_select, not table[idx]: the same gather, but its backward is an index_add (3x faster on CPU) where
        # indexing's is an accumulating index_put (8 % of a full-size Swin step on CPU, sort-based on CUDA)
        bias = self.relative_position_bias_table.index_select(0, idx).view(N, N, -1).permute(2, 0, 1)  # [heads, N, N]
        nW = q.shape[1] // self.heads
        bias = bias.expand(nW, -1, -1, -1) if mask is None else bias[None] + mask[:, None]  # [nW, heads, N, N]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, nW * self.heads, N, N).to(q.dtype))
        return self.proj(rearrange(x, 'b (n h) t d -> (b n) t (h d)', h=self.heads))


class SwinTransformerBlock3D(nn.Module):
    def __init__(self, dim, heads, window, shift, drop_path):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, self.window, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim*4, act_layer=nn.GELU)
        self.compiled = None  # compile_blocks(): (attend, feed_forward) compiled once for every block

    def attend(self, x, N, mask, pad):
        B, L, C = x.shape
        h = self.norm1(x)
        if pad is not None:  # padded tokens are zeros after norm1 and are not masked: keys and values, as in the original
            h = h.masked_fill(pad, 0)
        return self.attn(h.view(-1, N, C), B, mask).view(B, L, C)

    def feed_forward(self, x):
        return self.mlp(self.norm2(x))

    def forward(self, x, N, mask, pad):
        """x: [B, L, C], the layer's (zero-padded) tokens in the order of this block's windows, N tokens each;
        mask: the shifted windows' mask or None; pad: [L, 1], True at tokens of padding, or None.
        LayerNorm, MLP, residual and drop path act per token (per sample), so they run in any order."""
        # the drop path stays outside the compiled branches: its rate differs per block, and as a constant of the
        # graph it would give each block a compilation of its own
        attend, feed_forward = self.compiled or (type(self).attend, type(self).feed_forward)
        x = x + self.drop_path(attend(self, x, N, mask, pad))
        return x + self.drop_path(feed_forward(self, x))


def windows(grid, window, shift):
    """The token order a block attends in, as a key of window_order: None when it is the row-major order itself
    (no shift, and each window spans whole rows and planes: a window covering the grid, or time alone split)."""
    if not any(shift) and tuple(window[1:]) == tuple(grid[1:]):
        return None
    return tuple(grid), tuple(window), tuple(shift)


@functools.lru_cache(maxsize=64)
def window_order(grid, window, shift):
    """[D*H*W]: the row-major index in the (padded) D x H x W grid of each token of the windows a block attends
    in, window by window: the original's roll by -shift, then its partition into windows."""
    idx = torch.roll(torch.arange(math.prod(grid)).view(grid), shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    return rearrange(idx, '(d p) (h q) (w r) -> (d h w p q r)', p=window[0], q=window[1], r=window[2])


def in_order(order, n):
    return torch.arange(n) if order is None else window_order(*order)


@functools.lru_cache(maxsize=64)
def reorder_index(src, dst, n, device):
    """[n]: the index that takes tokens in order src to order dst (keys of window_order, None: row-major)."""
    where = torch.empty(n, dtype=torch.long)
    where[in_order(src, n)] = torch.arange(n)
    return where[in_order(dst, n)].to(device)


def reorder(x, src, dst):
    """[B, L, C] tokens from order src to order dst, one gather (the original rolls and partitions, then reverses
    and rolls back: four copies per shifted block) -> (tokens, dst)."""
    return (x if src == dst else x.index_select(1, reorder_index(src, dst, x.shape[1], x.device))), dst


@functools.lru_cache(maxsize=64)
def padding(size, grid, order, device):
    """[L, 1] True at the tokens that pad size up to grid, in the given order; None when nothing is padded."""
    if tuple(size) == tuple(grid):
        return None
    pad = F.pad(torch.zeros(size, dtype=torch.bool), (0, grid[2] - size[2], 0, grid[1] - size[1], 0, grid[0] - size[0]),
                value=True)
    return pad.view(-1)[in_order(order, pad.numel())].view(-1, 1).to(device)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4*dim, 2*dim, bias=False)
        self.norm = nn.LayerNorm(4*dim)

    def forward(self, x):  # [B, D, H, W, C]; time is never merged
        x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, heads, window, drop_path, downsample, grad_ckpt):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(w // 2 for w in window)
        self.grad_ckpt = grad_ckpt
        self.blocks = nn.ModuleList([
            SwinTransformerBlock3D(dim, heads, window, (0, 0, 0) if i % 2 == 0 else self.shift, drop_path[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):  # [B, D, H, W, C]
        B, D, H, W, C = x.shape
        window, shift = shrink_window((D, H, W), self.window, self.shift)
        grid = tuple(math.ceil(s / w) * w for s, w in zip((D, H, W), window))  # padded up to whole windows
        mask = shift_mask(*grid, window, shift, x.device)
        # the residual stream stays in the token order of the current block's windows, padding included (zeros on
        # entry, cropped at the end): one gather between blocks where the original rolls and partitions into windows,
        # then reverses and rolls back
        if grid != (D, H, W):
            x = F.pad(x, (0, 0, 0, grid[2] - W, 0, grid[1] - H, 0, grid[0] - D))
        x, order = x.flatten(1, 3), None  # None: row-major
        for blk in self.blocks:
            shifted = blk.shift != (0, 0, 0) and any(shift)
            x, order = reorder(x, order, windows(grid, window, shift if shifted else (0, 0, 0)))
            args = (math.prod(window), mask if shifted else None, padding((D, H, W), grid, order, x.device))
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False)
            else:
                x = blk(x, *args)
        x = reorder(x, order, None)[0].view(B, *grid, C)[:, :D, :H, :W]
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed3D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=(2, 4, 4), stride=(1, 4, 4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # [B, 3, T, H, W]
        # pad H, W up to multiples of 4 and append ONE zero frame, so T frames give T outputs
        x = F.pad(x, (0, -x.shape[4] % 4, 0, -x.shape[3] % 4, 0, 1))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))  # [B, T, H/4, W/4, C]


class SwinTransformer3D(nn.Module):
    def __init__(self, dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), window=(8, 7, 7), drop_path=0.2,
                 grad_ckpt=False):
        super().__init__()
        self.patch_embed = PatchEmbed3D(dim)
        dpr = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.layers = nn.ModuleList([
            BasicLayer(dim * 2**i, depths[i], heads[i], window, dpr[sum(depths[:i]):sum(depths[:i+1])],
                       downsample=i < len(depths)-1, grad_ckpt=grad_ckpt)
            for i in range(len(depths))])
        self.num_features = dim * 2**(len(depths)-1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x):  # [B, 3, T, H, W] -> [B, T, H/32, W/32, C]
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# Video and text embedders

class EncImg(nn.Module):
    def __init__(self, args, hidden):
        super().__init__()
        self.swin = SwinTransformer3D(args['vt_dim'], args['vt_depths'], args['vt_heads'], args['vt_window'],
                                      args['vt_drop_path'], args['grad_ckpt'])
        load_vt(self.swin, args['path_vt'], args.get('path_ckpt', ''))
        # a Linear only in non-default configs: no parameter, so the default key layout stays the original's
        self.proj = nn.Linear(self.swin.num_features, hidden) if self.swin.num_features != hidden else nn.Identity()
        self.emb_cls = nn.Parameter(0.02 * torch.randn(1, 1, 1, hidden))
        self.emb_pos = nn.Parameter(0.02 * torch.randn(1, 1, 1 + 14**2, hidden))
        self.emb_len = nn.Parameter(0.02 * torch.randn(1, MAX_FRAMES, 1, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def forward(self, img):
        B, T, _, H, W = img.shape
        h, w = H // 32, W // 32
        f = self.swin(((img - self.mean) / self.std).transpose(1, 2))  # [B, T, h, w, C]
        f = self.proj(f.reshape(B, T, h*w, -1))
        f = torch.cat([self.emb_cls.expand(B, T, -1, -1), f], dim=2)
        f = f + self.emb_pos[:, :, :1+h*w] + self.emb_len[:, :T]
        f = self.norm(f).flatten(1, 2)
        return f, torch.ones(f.shape[:2], dtype=torch.long, device=f.device)


class EncTxt(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.emb_txt = embeddings

    def forward(self, txt):
        return self.emb_txt(input_ids=txt)


STATE_DICT_WRAPPERS = ('model', 'state_dict', 'model_state_dict')  # where training loops keep the weights


def read_ckpt(path):
    """A checkpoint file -> its state dict: a plain one, or the one under 'model' (our resume files), 'state_dict'
    (PyTorch Lightning, many training loops) or 'model_state_dict'; the 'module.' prefix of a state dict saved from
    a DDP or DataParallel wrapper is dropped."""
    ckpt = read_checkpoint(path)
    wrapper = next((k for k in STATE_DICT_WRAPPERS if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), None)
    if wrapper is not None:
        ckpt = ckpt[wrapper]
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: holds a {type(ckpt).__name__}, not a state dict of tensors')
    odd = next((k for k in ckpt if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f'{path}: key {odd!r} is a {type(odd).__name__}: a state dict is named by str keys')
    if ckpt and all(isinstance(k, str) and k.startswith('module.') for k in ckpt):  # saved from a DDP / DataParallel wrapper
        ckpt = {k[len('module.'):]: v for k, v in ckpt.items()}
    return ckpt


def load_vt(swin, path, path_ckpt=''):
    """Video Swin weights from `path` (_tools/convert_video-swin.py's output). Only path '' gives a random VT. A
    missing file is an error, unless `path_ckpt` (load_ckpt fills the model from it later) holds every
    enc_img.swin.* weight, as the official downstream checkpoints do."""
    if not path:
        say('VT: path_vt is "": the video encoder starts random')
        return
    if not os.path.isfile(path):
        ckpt = read_ckpt(path_ckpt) if path_ckpt else {}
        lacking = [k for k, v in swin.state_dict().items() if not k.endswith('relative_position_index')
                   and getattr(ckpt.get('enc_img.swin.' + k), 'shape', None) != v.shape]
        if not lacking:
            say(f'VT: no file at {path}; the Video Swin weights come from {path_ckpt}')
            return
        raise FileNotFoundError(f'path_vt: no Video Swin weights at {path} (convert the Kinetics-400 checkpoint with '
                                f'_tools/convert_video-swin.py; path_vt "" starts the video encoder random)' +
                                (f'; path_ckpt {path_ckpt} lacks {len(lacking)} of them, e.g. {lacking[0]}' if path_ckpt else ''))
    try:
        sd = {k.removeprefix('enc_img.swin.'): v for k, v in read_ckpt(path).items()}
    except CheckpointError as e:  # (named as path_vt's, not path_ckpt's)
        raise CheckpointError(f'path_vt: {e}') from None
    own = swin.state_dict()
    misfit = sorted(k for k in own.keys() | sd.keys() if k not in sd or k not in own or misfit_tensor(sd[k], own[k]))
    if misfit:
        hint = ('; it is an unconverted Video Swin checkpoint ("backbone." keys): convert it with '
                '_tools/convert_video-swin.py' if any(str(k).startswith('backbone.') for k in sd.get('state_dict', sd)) else
                ' (vt_dim, vt_depths, vt_heads, vt_window and the checkpoint must describe the same Video Swin)')
        why = [f'{k} ({"missing" if k not in sd else "extra" if k not in own else misfit_tensor(sd[k], own[k])})'
               for k in misfit[:3]]
        raise CheckpointError(f'path_vt: {path}: Video Swin weights do not fit the configured VT ({len(misfit)} keys '
                              f'missing, extra, of another shape or type, or not finite, e.g. {", ".join(why)}){hint}')
    swin.load_state_dict(sd)
    say(f'VT: loaded {path}')


def load_bert(name):
    """(BertForMaskedLM, whether its weights are pretrained). A local dir without weights builds its config."""
    weights = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json', 'pytorch_model.bin.index.json')
    name = config.local_dir(name, 'txt_backbone')
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in weights):
        say(f'BERT: {name} has no weights; building its config with random weights')
        return transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(name))
    return config.pretrained(transformers.BertForMaskedLM.from_pretrained, name, 'txt_backbone')


# ----------------------------------------------------------------------------------------------
# VIOLET

class VIOLET_Base(nn.Module):
    task_type = ''  # the config 'type' it serves (named when a checkpoint comes from another task)

    def __init__(self, args):
        super().__init__()
        self.args = args = margs(args)
        bert = load_bert(args['txt_backbone'])
        self.hidden_size = bert.config.hidden_size
        self.enc_img = EncImg(args, self.hidden_size)
        # the original took the embeddings from a separate BertModel: a copy, so fc_mtm's decoder is not tied to it
        self.enc_txt = EncTxt(copy.deepcopy(bert.bert.embeddings))
        self.trsfr = bert.bert.encoder
        self.cross_layer = bert_layer  # compile_blocks() swaps in a compiled one
        self.add_heads(bert.cls)

    def add_heads(self, mlm_head):
        """Each task adds its heads here; mlm_head is BERT's MLM head (pretraining keeps it as fc_mtm)."""
        raise TypeError(f'{type(self).__name__} adds no heads: a task model defines add_heads')

    def make_head(self, n_out):
        D = self.hidden_size
        return nn.Sequential(nn.Dropout(self.args['head_dropout']), nn.Linear(D, D*2), nn.ReLU(inplace=True), nn.Linear(D*2, n_out))

    def go_feat(self, img, txt, mask):
        check_inputs(img, txt, mask)
        feat_img, mask_img = self.enc_img(img)
        return feat_img, mask_img, self.enc_txt(txt), mask

    def compile_blocks(self):
        """torch.compile every VT block and the CT layer: small graphs that blocks of one shape share, so compiling
        takes a fraction of the whole model's time. In place: the state dict keeps its keys."""
        cfg = torch._dynamo.config
        name = 'recompile_limit' if hasattr(cfg, 'recompile_limit') else 'cache_size_limit'
        # a block's graphs: 7 per (batch, frames, grad mode) at 224 px; pretraining meets about 16 of these (the full
        # and last batch of training, of attended masking's no-grad pass and of evaluation, for videos and images):
        # past the limit dynamo runs the rest uncompiled (at 64, most of the second dataset's)
        setattr(cfg, name, max(getattr(cfg, name), 256))
        cls = SwinTransformerBlock3D
        branches = (torch.compile(cls.attend, dynamic=False), torch.compile(cls.feed_forward, dynamic=False))
        for layer in self.enc_img.swin.layers:
            for blk in layer.blocks:
                blk.compiled = branches
        # the CT's sequence length follows the batch's longest text (fused_cls drops shared padding): torch's automatic
        # dynamic shapes compile a length-generic graph at the second length instead of one graph per length. Not for
        # the VT, whose shapes a config fixes: a batch-generic Swin graph compiles several times slower
        self.cross_layer = torch.compile(bert_layer)

    def go_cross(self, feat_img, mask_img, feat_txt, mask_txt, output_attentions=False, only=None):
        """CT on [video tokens ; text tokens] -> [B, L, D] (and the attention probabilities when asked).
        only=i: the caller reads position i alone, so the last layer computes just that row (its queries, feed-
        forward and residual; keys and values still come from every position) -> [B, 1, D]. Exact, and it saves
        most of a layer: 1/12 of the CT for bert-base."""
        x = torch.cat([feat_img, feat_txt], dim=1)
        keep = torch.cat([mask_img, mask_txt], dim=1).bool()[:, None, None, :]  # [B, 1, 1, L]
        keep = None if bool(keep.all()) else keep  # no mask: SDPA may take its flash kernel
        atts = []
        last = len(self.trsfr.layer) - 1
        for i, layer in enumerate(self.trsfr.layer):
            rows = only if i == last else None
            if self.args['grad_ckpt'] and self.training and not output_attentions:
                x = torch.utils.checkpoint.checkpoint(self.cross_layer, layer, x, keep, False, rows,
                                                      use_reentrant=False)[0]
            elif output_attentions:  # the explicit-softmax path (attended masking) stays eager
                x, att = bert_layer(layer, x, keep, True, rows)
                atts.append(att)
            else:
                x, _ = self.cross_layer(layer, x, keep, False, rows)
        return x, (tuple(atts) if output_attentions else None)

    def fused_cls(self, feat_img, mask_img, feat_txt, mask_txt):
        """[B, D]: the CT output at the text's [CLS] (position L_img), the input of every head but MLM / MVM.
        Text columns that are padding in every sample are dropped first (exact: padded keys are masked out, and
        only the CLS output is read); a batch left without padding then attends without a mask, on the fastest
        (flash) kernels. In pair scoring a batch holds one or two captions, so this is the common case."""
        used = mask_txt.any(0).nonzero()
        n = int(used.max()) + 1 if len(used) else 1
        L_img = feat_img.shape[1]
        return self.go_cross(feat_img, mask_img, feat_txt[:, :n], mask_txt[:, :n], only=L_img)[0][:, 0]

    def score(self, feat_img, mask_img, feat_txt, mask_txt):
        """Raw fc score of N aligned (video, text) pairs on the fused CLS (the text's [CLS]), the head in fp32."""
        return self.head_fp32(self.fused_cls(feat_img, mask_img, feat_txt, mask_txt)).squeeze(-1)

    def head_fp32(self, cls):
        """fc in fp32 even under autocast: half-precision scores (3 significant digits) turn rankings into ties."""
        with torch.autocast(cls.device.type, enabled=False):
            return self.fc(cls.float())

    def tied_keys(self):
        """{key: another key of the same tensor} (fc_mtm's bias and decoder bias are one parameter)."""
        first, twins = {}, {}
        for k, v in self.state_dict(keep_vars=True).items():
            if v.numel():
                twin = first.setdefault((v.data_ptr(), v.shape, v.dtype), k)
                if twin != k:
                    twins[k] = twin
                    twins.setdefault(twin, k)
        return twins

    def load_ckpt(self, path, need='any'):
        """Copy every key present in the model with the same shape; keep the model's own value for the rest.
        need: 'all' (evaluation, prediction: every model key must come from the file, the buffers of
        NOT_NEEDED aside), 'encoders' (training from a checkpoint: every enc_img.*, enc_txt.*, trsfr.* key; head
        keys may be new, and are reported) or 'any' (a deliberate partial load, init_partial). A need not met
        raises CheckpointError naming the file and the keys, before the model is touched.
        Returns (model keys not loaded, file keys the model does not use)."""
        if need not in ('all', 'encoders', 'any'):
            raise ValueError(f"load_ckpt: need must be 'all', 'encoders' or 'any', got {need!r}")
        if not path:
            say('===== Init VIOLET (no checkpoint) =====')
            return [], []
        ckpt = read_ckpt(path)
        own = self.state_dict()
        for k, twin in self.tied_keys().items():  # a file keeping one name of a tied tensor (safetensors' save_model)
            if k not in ckpt and twin in ckpt:
                ckpt = {**ckpt, k: ckpt[twin]}
        loaded, misfit = set(), {}
        for k, v in ckpt.items():
            if k in own and isinstance(v, torch.Tensor):
                why = misfit_tensor(v, own[k])
                if not why:
                    own[k] = v
                    loaded.add(k)
                else:
                    misfit[k] = why
        not_loaded = sorted(k for k in own if k not in loaded and not k.endswith(NOT_NEEDED))
        required = {'all': not_loaded, 'any': [],
                    'encoders': [k for k in not_loaded if k.startswith(ENCODERS)]}[need]
        if not loaded:  # (even a deliberate partial load takes something: a run from random weights has path_ckpt "")
            shown = (', '.join(f'{k} ({why})' for k, why in list(misfit.items())[:3])
                     or f'its keys: {", ".join(map(str, list(ckpt)[:3]))}{", ..." if len(ckpt) > 3 else ""}')
            raise CheckpointError(f'{path}: none of the file\'s {len(ckpt)} keys fits the model ({shown}); '
                                  f'it does not hold this model\'s weights' if ckpt else f'{path}: an empty state dict')
        if required:
            shown = ', '.join(f'{k} ({misfit.get(k, "missing")})' for k in required[:8])
            more = f', ... and {len(required) - 8} more' if len(required) > 8 else ''
            hint = ('set init_partial: true to start from a partial checkpoint on purpose' if need == 'encoders'
                    else 'it does not hold this model (another task, size_vocab or VT/BERT size?)')
            if 'fc_mvm.3.bias' in misfit:  # a pretraining checkpoint of the other MVM target (VQ tokens / pixels)
                file_target = {VQ_VOCAB: 'vq', 3*32*32: 'pixel'}.get(ckpt['fc_mvm.3.bias'].shape[0])
                hint = f"its MVM head is for mvm_target '{file_target}': set mvm_target={file_target}" if file_target else hint
            raise CheckpointError(f'{path}: {len(required)} of the model\'s {len(own)} keys are missing from the file '
                                  f'or of another shape (need={need}): {shown}{more}; {hint}')
        self.load_state_dict(own)
        unexpected = sorted(k for k in ckpt if k not in loaded and not k.endswith(NOT_NEEDED))
        say(f'===== Loaded {path}: {len(loaded)} keys; not loaded: {not_loaded}; unused from file: {unexpected} =====')
        if need == 'all':
            warn_other_task(path, self.task_type, self.args.get('task', ''))
        return not_loaded, unexpected


def misfit_tensor(v, own):
    """Why checkpoint value `v` cannot fill model tensor `own` ('' when it can): another shape; not a tensor; integers
    or booleans for float weights (they would be cast in silence); NaN or infinite weights."""
    if not isinstance(v, torch.Tensor):
        return f'a {type(v).__name__} in the file, not a tensor'
    if v.shape != own.shape:
        return f'{list(v.shape)} in the file, {list(own.shape)} in the model'
    if v.is_complex() or own.is_floating_point() and not v.is_floating_point():
        return f'{v.dtype} in the file, {own.dtype} in the model'
    # (a finite sum means every value is finite, and costs a twentieth of isfinite over 162M values)
    if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float32)) and not torch.isfinite(v).all():
        return 'NaN or infinite values in the file'
    return ''


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not hold what the model needs from it."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint holding objects that weights_only does not read (reading them could run code)."""


# constants of the architecture (relative_position_index) and a buffer old checkpoints carry (position_ids):
# never needed from a checkpoint, never reported
NOT_NEEDED = ('relative_position_index', 'position_ids')
ENCODERS = ('enc_img.', 'enc_txt.', 'trsfr.')
TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'  # torch.save before 1.6: a pickled magic number


def read_checkpoint(path, safe_globals=()):
    """The one reader of checkpoint files (initial weights, Video Swin weights, resume states): what torch.save
    wrote, tensors and plain containers only (weights_only: reading never runs code from the file; `safe_globals`
    adds classes of data, as torch.serialization.safe_globals takes them), or a .safetensors file (tensors only, by
    design). Anything else is a CheckpointError naming the file and what was expected (UnsafeCheckpoint: objects
    weights_only does not read)."""
    if os.path.isdir(path):
        raise folder_given(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            return safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file: {e}') from e
    with open(path, 'rb') as f:
        head = f.read(len(TORCH_LEGACY_MAGIC))
    if not head.startswith(b'PK\x03\x04') and head != TORCH_LEGACY_MAGIC:
        what = 'an empty file' if not head else 'a raw pickle' if head[:1] == b'\x80' else f'it starts with {head[:8]!r}'
        raise CheckpointError(f'{path}: not a PyTorch checkpoint (expected a file written by torch.save; {what})')
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f'{path}: holds objects other than tensors and plain containers, which are not read '
                               f'(reading them could run code): {weights_only_refusal(e)}') from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # (OSError: a zip cut in its first 64 KB)
        raise CheckpointError(f'{path}: truncated or corrupt PyTorch checkpoint (was its writing interrupted?): '
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from e


def newest_ckpt(folder):
    """The run folder's most recently written ckpt_violet_*.pt / .safetensors, or None."""
    ckpts = [os.path.join(folder, f) for f in os.listdir(folder)
             if f.startswith('ckpt_violet_') and f.endswith(('.pt', '.safetensors'))]
    return max(ckpts, key=os.path.getmtime, default=None)


def folder_given(path):
    """The CheckpointError for a folder given as a checkpoint file: it names the newest checkpoint in it."""
    newest = newest_ckpt(path)
    hint = f'the newest in it is {newest}' if newest else "a run's folder holds ckpt_violet_*.pt"
    return CheckpointError(f'{path} is a folder, not a checkpoint file ({hint})')


def weights_only_refusal(e):
    """The line of torch's weights_only error that names what it refused."""
    lines = [ln.strip() for ln in str(e).splitlines() if 'WeightsUnpickler error' in ln or 'Unsupported' in ln]
    return (lines or [str(e).strip().splitlines()[0]])[0].split('. Please use')[0]


def warn_other_task(path, type_, task):
    """Where a checkpoint's origin can be told (the args.json its run wrote beside it), warn when it comes from
    another task than the one it is used for."""
    origin = os.path.join(os.path.dirname(os.path.abspath(path)), 'args.json')
    if not os.path.isfile(origin):
        return
    try:
        with open(origin, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError):  # (not JSON, or not UTF-8)
        return
    if not isinstance(saved, dict):
        return
    was = (saved.get('type', ''), saved.get('task', '') if saved.get('type') != 'pretrain' else '')
    now = (type_, task if type_ != 'pretrain' else '')
    if was[0] and (was[0] != now[0] or (was[1] and now[1] and was[1] != now[1])):
        say(f'warning: {path} comes from a {" ".join(filter(None, was))} run ({origin}), '
            f'used here for {" ".join(filter(None, now))}')


def bert_layer(layer, x, keep, output_attentions, rows=None):
    """One post-LN BERT layer run from transformers' own modules: scaled-dot-product attention, or the
    explicit softmax when its probabilities are wanted (attended masking). rows=i: only position i's output
    ([B, 1, D]): queries, residuals and the feed-forward of that row alone."""
    sa = layer.attention.self
    heads = sa.num_attention_heads
    x_q = x if rows is None else x[:, rows:rows + 1]
    q, k, v = (rearrange(m(y), 'b l (h d) -> b h l d', h=heads) for m, y in ((sa.query, x_q), (sa.key, x), (sa.value, x)))
    p_drop = sa.dropout.p if layer.training else 0.0
    att = None
    if output_attentions:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        # after attention dropout, as transformers returns them: in train mode the original's attended masking
        # drew from these dropped-out probabilities
        att = F.dropout(scores.softmax(dim=-1), p_drop, layer.training)
        ctx = att @ v
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p_drop)
    ctx = rearrange(ctx, 'b h l d -> b l (h d)')
    so = layer.attention.output
    x = so.LayerNorm(so.dropout(so.dense(ctx)) + x_q)
    h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    out = layer.output
    return out.LayerNorm(out.dropout(out.dense(h)) + x), att


def check_inputs(img, txt, mask):
    if img.dim() != 5 or img.shape[2] != 3:
        raise ValueError(f'img must be [B, T, 3, H, W], got {list(img.shape)}')
    B, T, _, H, W = img.shape
    if T > MAX_FRAMES:
        raise ValueError(f'img has {T} frames; VIOLET takes at most {MAX_FRAMES} (emb_len)')
    if H % 32 or W % 32 or H > MAX_SIDE or W > MAX_SIDE:
        raise ValueError(f'image side must be a multiple of 32 and at most {MAX_SIDE}, got {H}x{W}')
    if txt.shape[0] != B or tuple(mask.shape) != tuple(txt.shape):
        raise ValueError(f'batch mismatch: img {list(img.shape)}, txt {list(txt.shape)}, mask {list(mask.shape)}')


def vtm_pairs(B, O, device):
    """For each video i: (i, text i), then O-1 other texts drawn without replacement."""
    noise = torch.rand(B, B, device=device)
    noise.fill_diagonal_(2.0)  # own text sorts last, so the first O-1 are random others
    neg = noise.argsort(dim=1)[:, :O-1]
    idx_txt = torch.cat([torch.arange(B, device=device)[:, None], neg], dim=1).flatten()
    return torch.arange(B, device=device).repeat_interleave(O), idx_txt


class VIOLET_Pretrain(VIOLET_Base):
    task_type = 'pretrain'

    def add_heads(self, mlm_head):
        self.fc = self.make_head(1)
        self.fc_mtm = mlm_head
        self.fc_mvm = self.make_head(VQ_VOCAB if self.args['mvm_target'] == 'vq' else 3*32*32)

    def get_att(self, img, txt, mask):
        """Per position: head-averaged attention it receives, summed over queries and the 12 layers."""
        feat_img, mask_img, feat_txt, mask_txt = self.go_feat(img, txt, mask)
        _, att = self.go_cross(feat_img, mask_img, feat_txt, mask_txt, output_attentions=True)
        return torch.stack([a.float().mean(dim=1) for a in att], dim=1).sum(dim=(1, 2))

    def forward(self, img, txt, mask, at_mtm=None, at_mvm=None):
        """-> MLM logits [B, X, vocab], MVM outputs [B, L_img, n], VTM logits [B, O] / temperature, VTM targets (0).
        at_mtm [B, X] / at_mvm [B, L_img] (bool): the MLM / MVM heads, which work per position, run on those
        positions alone and return [n, vocab] / [n, n_out]. Training passes the masked positions, the only ones
        the losses read: the same losses, without the largest matrices (30522 and 8192 classes) at every position."""
        B = img.shape[0]
        O = min(B, VTM_OPTIONS)
        feat_img, mask_img, feat_txt, mask_txt = self.go_feat(img, txt, mask)
        L_img = feat_img.shape[1]
        out, _ = self.go_cross(feat_img, mask_img, feat_txt, mask_txt)
        out_txt, out_img = out[:, L_img:], out[:, :L_img]
        out_mtm = self.fc_mtm(out_txt if at_mtm is None else out_txt[at_mtm])
        out_mvm = self.fc_mvm(out_img if at_mvm is None else out_img[at_mvm])
        i_img, i_txt = vtm_pairs(B, O, img.device)
        out_vtm = self.score(feat_img[i_img], mask_img[i_img], feat_txt[i_txt], mask_txt[i_txt]).view(B, O) / VTM_TEMPERATURE
        return out_mtm, out_mvm, out_vtm, torch.zeros(B, dtype=torch.long, device=img.device)


class VIOLET_QAMC(VIOLET_Base):
    task_type = 'qamc'

    def add_heads(self, mlm_head):
        self.fc = self.make_head(1)

    def forward(self, img, txt, mask):  # txt, mask: [B, O, X]
        B, O = txt.shape[:2]
        check_inputs(img, txt[:, 0], mask[:, 0])
        feat_img, mask_img = self.enc_img(img)
        feat_txt = self.enc_txt(txt.flatten(0, 1))
        # the video features are computed once and repeated per option
        return self.score(feat_img.repeat_interleave(O, 0), mask_img.repeat_interleave(O, 0),
                          feat_txt, mask.flatten(0, 1)).view(B, O)


class VIOLET_QAOE(VIOLET_Base):
    task_type = 'qaoe'

    def add_heads(self, mlm_head):
        if 'size_vocab' not in self.args:
            raise KeyError("VIOLET_QAOE needs args['size_vocab'] (number of answer classes)")
        self.fc = self.make_head(self.args['size_vocab'])

    def forward(self, img, txt, mask):
        return self.answer_logits(*self.go_feat(img, txt, mask))

    def answer_logits(self, feat_img, mask_img, feat_txt, mask_txt, fp32_head=False):
        """[B, size_vocab] answer logits from the fused CLS of already computed features. fp32_head (prediction): the
        head in fp32, as score()'s; training keeps the original's head under autocast."""
        out = self.fused_cls(feat_img, mask_img, feat_txt, mask_txt)
        return self.head_fp32(out) if fp32_head else self.fc(out)


class VIOLET_Retrieval(VIOLET_Base):
    task_type = 'retrieval'

    def add_heads(self, mlm_head):
        self.fc = self.make_head(1)

    def forward(self, img, txt, mask):
        """All B x B (video i, text j) pairs, score / VTM_TEMPERATURE as [B (video), B (text)]; target i for row i."""
        B = img.shape[0]
        feat_img, mask_img, feat_txt, mask_txt = self.go_feat(img, txt, mask)
        i_img = torch.arange(B, device=img.device).repeat_interleave(B)
        i_txt = torch.arange(B, device=img.device).repeat(B)
        out = self.score(feat_img[i_img], mask_img[i_img], feat_txt[i_txt], mask_txt[i_txt]).view(B, B) / VTM_TEMPERATURE
        return out, torch.arange(B, device=img.device)


MODELS = {'pretrain': VIOLET_Pretrain, 'qamc': VIOLET_QAMC, 'qaoe': VIOLET_QAOE, 'retrieval': VIOLET_Retrieval}
