"""Raw videos in, answers out: a checkpoint (fine-tuned, pretraining or official) on your own video files.

    python predict.py retrieval --ckpt X --videos DIR_OR_FILES --text "a dog catches a frisbee"   # videos ranked
    python predict.py qamc --ckpt X --video v.mp4 --question "..." --options A B C D E              # best option
    python predict.py qaoe --ckpt X --video v.mp4 --question "what is the man doing"               # top answers
    python predict.py pretrain --ckpt X --video v.mp4 --text "..."                                  # VTM match score
    python predict.py MODE --ckpt X --list rows.csv|rows.json      # one (video, text / question [, options]) per row

The model's config is the args.json beside the checkpoint (a training run's), NAME.json beside NAME.safetensors
(_tools/convert_ckpt.py's), or --config (e.g. _data/args_msrvtt-retrieval.json for an official checkpoint).
QA-OE answers are words: the run's vocab.json beside the checkpoint, or --vocab txt_<task>.json. Zero-shot:
retrieval and qamc modes also take a pretraining checkpoint (its VTM head scores the pairs).

Frames are sampled as _tools/extract_video-frame.py samples them (dataset.read_video, the same code) and go
through the training pipeline (dataset.pad_resize). Videos named on the command line must be readable (else one
line naming the file, exit 1); videos found in a folder or a list that cannot be read are skipped and listed.
--cache DIR keeps each video's features, so a new text over an indexed library costs only the cross-encoder
passes. Prints a table; --out writes the results as JSON. Everything runs through api.py.
"""
import argparse
import csv
import io
import json
import os
import re
import sys
import time

from tqdm import tqdm

import api
import config
import dataset

MODES = ('retrieval', 'qamc', 'qaoe', 'pretrain')


def read_rows(path):
    """--list: a CSV with a header, or a JSON list of objects; keys video, text or question, and for qamc options
    (a JSON list, or 'A|B|C' in CSV) or option_0 ... option_N. Video paths are relative to the list's folder."""
    try:
        text = dataset.read_text(path)  # (UTF-8, an Excel CSV's BOM dropped)
    except (OSError, dataset.DataError) as e:
        raise SystemExit(f'--list: {e}' if isinstance(e, dataset.DataError) else
                         f'--list: cannot read {path}: {e.strerror or e}') from None
    if path.lower().endswith('.json'):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f'{path}: not valid JSON ({e})') from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SystemExit(f'{path}: a JSON list of objects is expected')
    else:
        reader = csv.DictReader(io.StringIO(text, newline=''))
        try:
            rows = list(reader)
        except csv.Error as e:
            raise SystemExit(f'{path} line {reader.line_num}: not valid CSV ({e})') from None
    if not rows:  # (it ended in 'no readable video')
        raise SystemExit(f'{path}: no rows (a header and one line a video, or a JSON list of objects)')
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(rows):
        if not r.get('video'):
            raise SystemExit(f'{path}: row {i + 1} has no "video"')
        wrong = next((k for k in ('video', 'text', 'question') if r.get(k) is not None and not isinstance(r[k], str)), None)
        if wrong or not isinstance(r.get('options'), (str, list, type(None))):
            k = wrong or 'options'
            raise SystemExit(f'{path}: row {i + 1}: "{k}" is a {type(r[k]).__name__} ({r[k]!r:.40}), not '
                             + ('a list of str' if k == 'options' else 'a str'))
        if not str(r.get('text') or r.get('question') or '').strip():  # a misspelt column would score an empty text
            raise SystemExit(f'{path}: row {i + 1} has no "text" or "question" (its keys: {", ".join(map(str, r))})')
        opts = r.get('options')
        if isinstance(opts, str):
            opts = opts.split('|')
        if opts is None and 'option_0' in r:
            opts = [r[k] for k in sorted((k for k in r if re.fullmatch(r'option_\d+', str(k))), key=lambda k: int(k[7:]))]
        try:
            api.words(opts or [], 'option')
        except ValueError as e:
            raise SystemExit(f'{path}: row {i + 1}: {e}') from e
        out.append(dict(video=os.path.join(base, r['video']), text=r.get('text') or r.get('question'),
                        options=opts))
    return out


def expand(paths):
    """Files as given (must be readable), folders -> their files (sorted; unreadable ones skipped and listed).
    -> [(path, named on the command line)]."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            # (every entry but folders: a broken link or a pipe is skipped and listed with its reason, not dropped)
            files = [(os.path.join(p, f), False) for f in sorted(os.listdir(p))
                     if not f.startswith('.') and not os.path.isdir(os.path.join(p, f))]
            folders = sorted(f for f in os.listdir(p) if os.path.isdir(os.path.join(p, f)))
            if folders:  # 'no readable video' said nothing of the videos one level down
                print(f'predict: {p}: its folders are not searched ({", ".join(folders[:5])}'
                      f'{" ..." if len(folders) > 5 else ""}): name them to include them', file=sys.stderr)
            if not files:
                raise SystemExit(f'predict: {p}: no files' + (' (only folders)' if folders else ''))
            out += files
        else:
            out.append((p, True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('mode', choices=MODES)
    ap.add_argument('--ckpt', required=True, help='.pt or .safetensors')
    ap.add_argument('--config', default=None, help="the model's config (default: args.json or NAME.json beside --ckpt)")
    ap.add_argument('--video', '--videos', dest='videos', nargs='+', default=[], help='video files and folders')
    ap.add_argument('--text', nargs='+', default=[], help='retrieval / pretrain: one or more texts')
    ap.add_argument('--question', default='')
    ap.add_argument('--options', nargs='+', default=None, help='qamc: the candidate answers')
    ap.add_argument('--list', default='', help='CSV or JSON rows of (video, text / question [, options])')
    ap.add_argument('--vocab', default=None, help="qaoe: answer texts (txt_<task>.json, or a vocab.json list)")
    ap.add_argument('--top', type=config.int_at_least(1), default=5, help='qaoe: answers shown; retrieval: videos shown per text')
    ap.add_argument('--frames', type=int, default=0, help="frames per video (0: the config's size_frame, else 5; 4 pretrain)")
    ap.add_argument('--cache', default='', help='folder of per-video features, reused by later runs')
    ap.add_argument('--upright', action='store_true', help="turn videos with a rotation in their header upright (as "
                    "the extraction tool's --upright; off: frames as encoded, as the original extracted them)")
    ap.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda when present)')
    ap.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA; the heads stay in fp32)')
    ap.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='config overrides (e.g. txt_backbone=DIR)')
    ap.add_argument('--out', default='', help='write the results as JSON')
    opt = ap.parse_args(argv)
    if opt.out:  # (before the work: a folder, or a path under a file, failed once the results were printed)
        if os.path.isdir(opt.out):
            raise SystemExit(f'predict: --out {opt.out} is a folder: give a file name (e.g. {opt.out}/results.json)')
        folder = os.path.dirname(os.path.abspath(opt.out))
        why = dataset.make_folder(folder)
        if why:
            raise SystemExit(f'predict: --out {opt.out}: cannot make its folder {folder}: {why}')

    if opt.list:
        jobs = [dict(r, named=False) for r in read_rows(opt.list)]
    else:
        if not opt.videos:
            ap.error('give --video (files or folders) or --list')
        texts = opt.text if opt.mode in ('retrieval', 'pretrain') else [opt.question]
        if not any(texts):
            ap.error('--text is required' if opt.mode in ('retrieval', 'pretrain') else '--question is required')
        if opt.mode == 'qamc' and not opt.options:
            ap.error('qamc needs --options')
        if opt.mode != 'qamc' and opt.options:  # (they were ignored in silence)
            ap.error(f'--options are for qamc; {opt.mode} ' + ('answers from its vocabulary' if opt.mode == 'qaoe' else
                                                                'scores --text'))
        try:
            api.words(texts, 'text' if opt.mode in ('retrieval', 'pretrain') else 'question')
            api.words(opt.options or [], 'option')
        except ValueError as e:
            ap.error(str(e))
        jobs = [dict(video=v, named=named, text=t, options=opt.options) for v, named in expand(opt.videos) for t in texts]
    try:
        m = api.load(opt.ckpt, opt.config, opt.vocab, opt.device, 'bf16' if opt.bf16 else 'fp32', opt.frames,
                 opt.cache or None, opt.set, opt.upright)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'predict: {e}') from e
    if (opt.mode == 'qaoe') != (m.type == 'qaoe'):
        raise SystemExit(f'predict: {opt.ckpt} is a {m.type} model; mode {opt.mode} needs '
                         + ('a qaoe one' if opt.mode == 'qaoe' else 'a pretrain, retrieval or qamc one'))
    if opt.mode == 'qaoe' and m.vocab is None:  # (it was a traceback from api, after every video was decoded)
        raise SystemExit(f'predict: {opt.ckpt} has no answer vocabulary (no vocab.json beside it, none stored): '
                         f'give --vocab txt_<task>.json (its "vocab") or a JSON list of the answers by class index')
    if opt.mode == 'pretrain' and m.type != 'pretrain':  # (its scores would have been called the VTM head's)
        raise SystemExit(f'predict: {opt.ckpt} is a {m.type} model; mode pretrain scores with a pretraining '
                         f'checkpoint\'s VTM head: use mode {"retrieval" if m.type == "retrieval" else "qamc"}')

    # features once per video; unreadable ones named (and fatal when named on the command line)
    t0, skipped = time.time(), []
    videos = list(dict.fromkeys(j['video'] for j in jobs))
    api.MEMO_VIDEOS = max(api.MEMO_VIDEOS, len(videos))  # every video's features kept for its jobs (decoded once)
    for v in tqdm(videos, desc='videos', unit='video', ascii=True, disable=len(videos) < 10):
        try:
            m.video_features(v)
        except dataset.WriteError as e:  # the --cache folder's disk is full: nothing is lost but time, say so
            raise SystemExit(f'predict: {e}; make room, or run without --cache') from e
        except (dataset.BadVideo, OSError) as e:
            if any(j['named'] for j in jobs if j['video'] == v):
                raise SystemExit(f'predict: {e}') from e
            skipped.append(dict(video=v, error=str(e)))
            tqdm.write(f'skipped: {e}', file=sys.stderr)
    bad = {s['video'] for s in skipped}
    jobs = [j for j in jobs if j['video'] not in bad]
    if not jobs:
        raise SystemExit('predict: no readable video')
    sec_video = time.time() - t0

    results = run(m, opt.mode, jobs, opt)
    res = dict(mode=opt.mode, ckpt=opt.ckpt, model=m.type, device=str(m.device), precision=m.precision,
               n_frames=m.n_frames, n_videos=len({j['video'] for j in jobs}), sec_video=sec_video,
               pairs_per_s=m.pairs_per_s, results=results, skipped=skipped)
    print(table(opt.mode, results, opt.top))
    if m.pairs_per_s:
        print(f'{res["n_videos"]} videos ({sec_video:.1f} s for their features); pairs {m.pairs_per_s:.0f}/s')
    if skipped:
        print(f'skipped {len(skipped)} unreadable: ' + ', '.join(s['video'] for s in skipped))
    if opt.out:
        try:
            dataset.write_json(res, opt.out, indent=1)
        except dataset.WriteError as e:  # the results are printed above: say that only the file is missing
            raise SystemExit(f'predict: {e} (the results are printed above)') from e
        print(f'wrote {opt.out}')
    return res


def run(m, mode, jobs, opt):
    if mode == 'qaoe':
        return [dict(video=j['video'], question=j['text'], **m.answer(j['video'], j['text'], top=opt.top)) for j in jobs]
    if mode == 'qamc':
        for j in jobs:
            if not j['options']:
                raise SystemExit(f'predict: qamc needs options for {j["video"]}')
        return [dict(video=j['video'], question=j['text'], **m.answer(j['video'], j['text'], j['options'])) for j in jobs]
    if opt.list:  # one pair per row
        return [dict(video=j['video'], text=j['text'], score=float(m.score([j['video']], [j['text']])[0, 0]))
                for j in jobs]
    videos, texts = list(dict.fromkeys(j['video'] for j in jobs)), list(dict.fromkeys(j['text'] for j in jobs))
    s = m.score(videos, texts)
    if mode == 'pretrain':
        return [dict(video=v, text=t, score=float(s[i, k])) for i, v in enumerate(videos) for k, t in enumerate(texts)]
    return [dict(text=t, ranking=[dict(video=videos[i], score=float(s[i, k])) for i in (-s[:, k]).argsort(kind='stable')])
            for k, t in enumerate(texts)]


def table(mode, results, top):
    # videos by file name, or by path where two of them share one (clips of one name in different folders)
    paths = {x['video'] for r in results for x in r.get('ranking', [r])}
    short = len({os.path.basename(p) for p in paths}) == len(paths)
    name = lambda p: os.path.basename(p) if short else p
    lines = []
    if mode == 'retrieval' and results and 'ranking' in results[0]:
        for r in results:
            lines.append(f'"{r["text"]}"')
            lines += [f'  {i + 1:>4}  {x["score"]:9.4f}  {name(x["video"])}' for i, x in enumerate(r['ranking'][:top])]
    elif mode in ('retrieval', 'pretrain'):
        lines.append(f'{"score":>9}  {"video":24s} text')
        lines += [f'{r["score"]:9.4f}  {name(r["video"]):24s} {r["text"]}' for r in results]
    elif mode == 'qamc':
        for r in results:
            lines.append(f'{name(r["video"])}: {r["question"]}')
            lines += [f'  {"*" if i == r["index"] else " "} {o["prob"]:6.3f}  {o["option"]}' for i, o in enumerate(r['options'])]
    else:
        for r in results:
            lines.append(f'{name(r["video"])}: {r["question"]}')
            for a in r['top']:  # (a class past the training json's "vocab" has no text: null in vocab.json)
                lines.append(f'    {a["prob"]:6.3f}  ' + (a['answer'] if a['answer'] is not None else
                                                         f'(class {a["index"]}: no answer text)'))
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
