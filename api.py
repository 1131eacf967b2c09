"""Use a checkpoint from Python: one loader and four calls. predict.py is built on exactly these.

    import api
    m = api.load('ckpt_violet_toy-qaoe_6.pt')         # the config: args.json beside it (a run's), NAME.json
                                                     # (_tools/convert_ckpt.py's), or config=PATH_OR_DICT
    m.score(['a.mp4', 'b.mp4'], ['a red dot moves up'])   # [n_videos, n_texts] raw scores (retrieval / VTM / QA-MC head)
    m.answer('a.mp4', 'what color is the dot?')           # QA-OE: top answers as text, with probabilities
    m.answer('a.mp4', 'what does the video show?', options=['...', '...'])   # QA-MC (or zero-shot with the VTM head)
    m.embed_video('a.mp4')                                # (features [L, D], mask [L]): what --cache stores

A video is a file path (frames sampled by dataset.read_video, as _tools/extract_video-frame.py samples them), a
[T, H, W, 3] uint8 array or a list of PIL images (all T frames used). Frames go through dataset.pad_resize, the
training pipeline; the model normalises them. Every model key must come from the checkpoint (need='all').
"""
import collections
import hashlib
import numbers
import os
import time
from collections.abc import Iterable

import numpy as np
import safetensors.torch
import torch

import agent
import dataset
from config import read_file
import model as violet

MEMO_VIDEOS = 1024  # videos whose features a Violet keeps in memory (about 0.8 MB each at full size, on its device)
TEMPERATURE = {'qamc': 1.0, 'pretrain': violet.VTM_TEMPERATURE, 'retrieval': violet.VTM_TEMPERATURE}  # option probabilities: softmax(score / T), as trained


def as_list(items, what, of):
    """A sequence given for several items (a list, a tuple, a numpy array, a pandas Series, ...) -> a list; one str,
    path or bytes (scored letter by letter, before this check), a set or dict (no order) -> ValueError."""
    if isinstance(items, (str, bytes, os.PathLike, set, frozenset, dict)) or not isinstance(items, Iterable) \
            or (isinstance(items, np.ndarray) and items.ndim == 0):
        raise ValueError(f'{what} must be a list {of}, got {type(items).__name__} {items!r:.60}')
    return list(items)


def whole(x, what, least, hint=''):
    """An int argument (a numpy integer too) >= least -> int; ValueError otherwise (not a bool, not a float)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < least:
        raise ValueError(f'{what} must be an int >= {least}{hint}, got {x!r}')
    return int(x)


def words(texts, what, tokzr=None):
    """Every text must hold a word (dataset.has_words; without the model's tokenizer, as predict.py checks its
    arguments before loading it, a character other than white space): an empty one would be scored as [CLS] [SEP]
    alone (dataset.py makes it a bad sample in training for the same reason). -> the texts as a list; ValueError
    naming the first."""
    texts = as_list(texts, f'{what}s', 'of str')
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f'{what} {i} is {t!r}: a str, not {type(t).__name__}')
        if not (dataset.has_words(tokzr, t) if tokzr else t.strip()):
            raise ValueError(f'{what} {i} is {t!r}: it needs words (an empty one would be scored as [CLS] [SEP] alone)')
    return [str(t) for t in texts]  # (numpy's str_ as str: JSON output)


def fspath(x):
    """A path-like (pathlib.Path) as its str; anything else as it is."""
    return os.fspath(x) if isinstance(x, os.PathLike) else x


def find_config(ckpt, config=None):
    """-> (config dict, vocab list or None, where the config came from). config: a dict, a JSON file (a run's args.json,
    an _data/args_*.json or convert_ckpt's NAME.json holding {"config", "vocab"}), or None: NAME.json, then args.json
    beside ckpt."""
    if os.path.isdir(ckpt):  # (a run's folder: 'checkpoint not found' would be wrong)
        raise violet.folder_given(ckpt)
    if config is None:
        if not os.path.isfile(ckpt):  # (else its missing config would be named first)
            raise FileNotFoundError(f'checkpoint not found: {ckpt}')
        for cand in (os.path.splitext(ckpt)[0] + '.json', os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'args.json')):
            if os.path.isfile(cand):
                config = cand
                break
        else:
            raise FileNotFoundError(f'{ckpt}: no config beside it (NAME.json or args.json); give one (--config: a '
                                    f"run's args.json or _data/args_<task>.json)")
    where = config if isinstance(config, str) else 'config'
    if isinstance(config, str):
        config = read_file(config)
    if not isinstance(config, dict):
        raise ValueError(f'{where}: a config is a JSON object of keys, not {type(config).__name__}')
    if 'config' in config:  # convert_ckpt's file
        if not isinstance(config['config'], dict):
            raise ValueError(f'{where}: its "config" must be a JSON object of keys, not {type(config["config"]).__name__}')
        return config['config'], config.get('vocab'), where
    return config, None, where


def read_vocab(src):
    """Answer texts by class index from a list, a vocab.json (a list) or a txt_<task>.json (its "vocab")."""
    if isinstance(src, (list, tuple)):
        return [None if a is None else str(a) for a in src]
    obj = dataset.load_json(src)
    if isinstance(obj, dict):  # a txt_<task>.json: its "vocab", or VIOLETv2's "ans2label", as Dataset_QAOE reads them
        obj = dataset.json_key(obj, 'ans2label' if 'ans2label' in obj and 'vocab' not in obj else 'vocab', src)
        return dataset.answer_texts(obj, src)
    # a vocab.json: null for a class without an answer text (a size_vocab past the training json's "vocab")
    return dataset.answer_texts(obj, src, blank=True)


def load(ckpt, config=None, vocab=None, device=None, precision='fp32', n_frames=0, cache=None, sets=(), upright=False):
    """Build the model the config's type names (pretrain, qamc, qaoe, retrieval), fill every key from `ckpt`
    (.pt or .safetensors). vocab: QA-OE answer texts (a list or a file; default the run's vocab.json beside the
    checkpoint or convert_ckpt's). precision 'fp32' or 'bf16' (autocast). n_frames: frames sampled from a video
    file (0: the config's size_frame, else 5, the released downstream sets; 4 for pretraining). cache: a folder
    for per-video features. sets: KEY=VALUE config overrides. upright: turn rotated video files upright
    (dataset.read_video; as the extraction tool's --upright: off, as the original, frames as they are encoded). -> Violet."""
    ckpt, config, vocab, cache = map(fspath, (ckpt, config, vocab, cache))
    if precision not in ('fp32', 'bf16'):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    n_frames = whole(n_frames, 'n_frames', 0, ' (0: the config\'s)')
    cfg, cfg_vocab, where = find_config(ckpt, config)
    try:  # (the scripts' config errors are SystemExit: a library raises ValueError, which `except Exception` takes)
        args = agent.load_args(where, as_list(sets, 'sets', 'of KEY=VALUE str'), base=cfg)  # (a wrong key named with its file)
    except SystemExit as e:
        raise ValueError(str(e)) from None
    dataset.check_size_txt(args)
    args['path_ckpt'] = ckpt  # the VT weights come from it (model.load_vt), not from path_vt
    type_ = args['type'] or 'retrieval'
    if vocab is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'vocab.json')
        vocab = cfg_vocab or (beside if os.path.isfile(beside) else None)
    vocab = read_vocab(vocab) if vocab is not None else None
    if type_ == 'qaoe':
        if not args['size_vocab']:
            if vocab is None:
                raise ValueError(f'{ckpt}: a QA-OE checkpoint needs its answer vocabulary (size_vocab is 0 and no '
                                 f'vocab.json beside it): give the task\'s txt_<task>.json (--vocab)')
            args['size_vocab'] = len(vocab)
        if vocab is not None and len(vocab) < args['size_vocab']:
            raise ValueError(f'{ckpt}: the answer vocabulary has {len(vocab)} entries, the model '
                             f'{args["size_vocab"]} classes (a class without an answer text: null in a JSON list)')
    device = pick_device(device)
    with torch.random.fork_rng(devices=[]):  # (its random init, replaced by the checkpoint, drew from the caller's RNG)
        mdl = violet.MODELS[type_](args)
    mdl.load_ckpt(ckpt, need='all')
    n_frames = n_frames or args['size_frame'] or (4 if type_ == 'pretrain' else 5)
    if not 1 <= n_frames <= violet.MAX_FRAMES:
        raise ValueError(f'frames: {n_frames}, but VIOLET takes 1 to {violet.MAX_FRAMES} per video (emb_len)')
    return Violet(mdl.to(device).eval(), args, type_, vocab, device, precision, n_frames, cache, ckpt, upright)


def pick_device(name):
    """A device name (None: cuda when present) -> torch.device; ValueError for one that is not, or not here."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise ValueError(f'device {name!r}: not a device name (cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda' and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f'device {name}: ' + (f'this machine has {torch.cuda.device_count()} CUDA GPU(s)'
                                               if torch.cuda.is_available() else 'no CUDA GPU here') + '; --device cpu runs on the CPU')
    backend = getattr(torch, device.type, None)  # (mps, xpu, ...: a traceback at the model's .to() when absent)
    if device.type not in ('cpu', 'cuda') and not (backend is not None and backend.is_available()):
        raise ValueError(f'device {name}: no {device.type} device here (this torch or machine lacks it); --device cpu '
                         f'runs on the CPU')
    return device


class Violet:
    def __init__(self, mdl, args, type_, vocab, device, precision, n_frames, cache, ckpt, upright=False):
        """Made by load(), which checks its arguments."""
        self.model, self.args, self.type, self.vocab = mdl, args, type_, vocab
        self.device, self.precision, self.n_frames, self.cache = device, precision, n_frames, cache
        self.upright = upright
        self.tokzr = dataset.get_tokenizer(args['txt_backbone'], args['txt_vocab'])
        st = os.stat(ckpt)
        # a cached feature belongs to these weights and this input shape
        self.fingerprint = f'{os.path.abspath(ckpt)}|{st.st_size}|{st.st_mtime_ns}|{args["size_img"]}|{precision}'
        self.memo = collections.OrderedDict()  # the last MEMO_VIDEOS videos' features (forget() empties it)
        self.pairs_per_s = None
        why = cache and dataset.make_folder(cache)
        if why:
            raise ValueError(f'cache {cache}: cannot make the folder: {why}')

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16')

    # ---- inputs
    def frames(self, video):
        """-> float [T, 3, S, S] in [0, 1]: a path (n_frames sampled by dataset.read_video), a [T, H, W, 3] uint8
        array or a list of PIL images, each frame through dataset.pad_resize."""
        video = fspath(video)
        if isinstance(video, str):
            rgb = dataset.read_video(video, self.n_frames, self.upright)  # a video with fewer frames is a BadVideo
        elif isinstance(video, np.ndarray):
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(f'a video array must be uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}')
            rgb = list(video)
        elif isinstance(video, (list, tuple)) and video and all(hasattr(im, 'convert') for im in video):
            rgb = [dataset.rgb_array(im) for im in video]  # (16-bit grey scaled, as a stored frame is)
        else:
            raise TypeError(f'a video is a path, a [T, H, W, 3] uint8 array or a list of PIL images, got {type(video).__name__}')
        if not 1 <= len(rgb) <= violet.MAX_FRAMES or any(min(f.shape[:2]) < 1 for f in rgb):
            raise ValueError(f'a video of {len(rgb)} frames of {[list(f.shape[:2]) for f in rgb[:1]]} pixels: VIOLET '
                             f'takes 1 to {violet.MAX_FRAMES} frames (emb_len), each at least 1 x 1')
        size = self.args['size_img']
        return torch.stack([dataset.pad_resize(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1), size)
                            for f in rgb])

    def video_key(self, video):
        """A video file's identity: its absolute path, size and time of change (a file rewritten, or the same
        relative name from another folder, is another video)."""
        try:
            st = os.stat(video)
        except OSError:
            self.frames(video)  # its BadVideo names what is wrong (missing, a broken link, ...)
            raise
        return f'{os.path.abspath(video)}|{st.st_size}|{st.st_mtime_ns}|{self.n_frames}' + '|upright' * self.upright

    def cache_file(self, key):
        return os.path.join(self.cache, hashlib.sha256(f'{self.fingerprint}|{key}'.encode()).hexdigest()[:32] + '.safetensors')

    def forget(self):
        """Empty the in-memory features (the cache folder keeps its files)."""
        self.memo.clear()

    @torch.no_grad()
    def embed_video(self, video):
        """-> (features [L, D] float32, mask [L]) of the video encoder, copies; computed once per file (memory: the
        last MEMO_VIDEOS files; and the cache folder when given)."""
        feat, mask = self.video_features(fspath(video))
        return feat.clone(), mask.clone()

    @torch.no_grad()
    def video_features(self, video):
        """embed_video's (features, mask) themselves: the memo's own tensors."""
        key = self.video_key(video) if isinstance(video, str) else None
        if key is not None and key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        path = self.cache_file(key) if key is not None and self.cache else None
        out = self.cached(path) if path and os.path.isfile(path) else None
        if out is None:
            with self.autocast():
                feat, mask = self.model.enc_img(self.frames(video)[None].to(self.device))
            out = feat[0].float(), mask[0]
            if path:
                agent.save_safetensors({'feat': out[0], 'mask': out[1]}, path)
        if key is not None:
            self.memo[key] = out
            while len(self.memo) > MEMO_VIDEOS:
                self.memo.popitem(last=False)
        return out

    def cached(self, path):
        """A cache file's (features, mask); None, said, when it cannot be read (cut short by a kill or a full disk, or
        not one of ours): computed again and rewritten."""
        try:
            t = safetensors.torch.load_file(path, device=str(self.device))
            feat, mask = t['feat'], t['mask']
            L = self.n_frames * (1 + (self.args['size_img'] // 32) ** 2)
            if feat.shape != (L, self.model.hidden_size) or mask.shape != (L,):
                raise ValueError(f'features {list(feat.shape)} and mask {list(mask.shape)}, expected [{L}, '
                                 f'{self.model.hidden_size}] and [{L}]')
            return feat, mask
        except (safetensors.SafetensorError, OSError, KeyError, ValueError) as e:
            print(f'cache: {path} unreadable ({type(e).__name__}: {e}); computed again', flush=True)
            return None

    @torch.no_grad()
    def embed_text(self, texts):
        ids, mask = zip(*[dataset.tokenize(self.tokzr, t, self.args['size_txt']) for t in texts])
        ids = torch.as_tensor(np.stack(ids), device=self.device)
        with self.autocast():
            feat = self.model.enc_txt(ids).float()
        return feat, torch.as_tensor(np.stack(mask), device=self.device)

    # ---- the calls
    @torch.no_grad()
    def score(self, videos, texts, size_pair=0):
        """Raw head score of every (video, text) pair -> float numpy [len(videos), len(texts)]. Video features once
        per video; the pairs then cost one cross-encoder pass each, in batches (self.pairs_per_s: their speed)."""
        if self.type == 'qaoe':
            raise ValueError('a QA-OE model has no pair score: use answer()')
        texts = words(texts, 'text', self.tokzr)
        videos = as_list(videos, 'videos', '(of paths, arrays or frame lists)')
        size_pair = whole(size_pair, 'size_pair', 0, ' (0: 512 on CUDA, 64 on CPU)')  # (a negative one returned uninitialised memory)
        if not len(videos) or not len(texts):
            return np.zeros((len(videos), len(texts)), np.float32)
        feats = [self.video_features(fspath(v)) for v in videos]
        feat_img, mask_img = torch.stack([f for f, _ in feats]), torch.stack([m for _, m in feats])
        feat_txt, mask_txt = self.embed_text(texts)
        n_v, n_t = len(videos), len(texts)
        size_pair = size_pair or (512 if self.device.type == 'cuda' else 64)
        out = torch.empty(n_v * n_t, device=self.device)
        t0 = time.time()
        for i in range(0, n_v * n_t, size_pair):
            idx = torch.arange(i, min(i + size_pair, n_v * n_t), device=self.device)
            v, t = idx // n_t, idx % n_t
            with self.autocast():
                out[idx] = self.model.score(feat_img[v], mask_img[v], feat_txt[t], mask_txt[t]).float()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        self.pairs_per_s = n_v * n_t / max(time.time() - t0, 1e-9)
        return out.view(n_v, n_t).cpu().numpy()

    @torch.no_grad()
    def answer(self, video, question, options=None, top=5):
        """options given (QA-MC; zero-shot with a pretraining or retrieval checkpoint): each question + ' ' +
        option scored, probabilities softmax(score / temperature of its training) -> dict(answer, index, prob,
        options=[{option, score, prob}]). No options (QA-OE): -> dict(answer, index, prob, top=[{answer, index, prob}])."""
        if not isinstance(question, str):  # (None was scored as the text "None")
            raise ValueError(f'question must be a str, got {type(question).__name__}')
        top = whole(top, 'top', 1)
        if options is not None:
            if self.type == 'qaoe':
                raise ValueError('a QA-OE model answers from its vocabulary: call answer() without options')
            options = words(options, 'option', self.tokzr)  # the question may be empty (caption-choice sets have none), an option not
            if not options:
                raise ValueError('options is empty: give the candidate answers')
            texts = [f'{question} {o}' for o in options]
            ids = [tuple(dataset.tokenize(self.tokzr, t, self.args['size_txt'])[0]) for t in texts]
            same = next(((i, j) for j in range(len(ids)) for i in range(j) if ids[i] == ids[j]), None)
            if same:  # (their scores tied but for float noise, and the answer looked like one)
                raise ValueError(f'options {same[0]} and {same[1]} are the same text to the model once question + '
                                 f'option is cut to size_txt {self.args["size_txt"]} tokens: shorten the question')
            s = self.score([video], texts)[0]
            p = torch.softmax(torch.as_tensor(s, dtype=torch.float64) / TEMPERATURE[self.type], 0).numpy()
            i = int(np.argmax(s))
            return dict(answer=options[i], index=i, prob=float(p[i]),
                        options=[dict(option=o, score=float(a), prob=float(b)) for o, a, b in zip(options, s, p)])
        if self.type != 'qaoe':
            raise ValueError(f'a {self.type} model chooses among options: give options')
        if self.vocab is None:
            raise ValueError('no answer vocabulary: load(..., vocab=...): the answer texts by class index (a JSON '
                             'list, or a txt_<task>.json with "vocab"; the official checkpoints have none stored)')
        words([question], 'question', self.tokzr)
        feat_img, mask_img = self.video_features(fspath(video))
        feat_txt, mask_txt = self.embed_text([question])
        with self.autocast():
            logits = self.model.answer_logits(feat_img[None], mask_img[None], feat_txt, mask_txt, fp32_head=True)[0]
        p = torch.softmax(logits.double(), 0)
        best = p.topk(min(top, len(p)))
        tops = [dict(answer=self.vocab[i], index=int(i), prob=float(q)) for q, i in zip(best.values, best.indices.tolist())]
        return dict(answer=tops[0]['answer'], index=tops[0]['index'], prob=tops[0]['prob'], top=tops)
