"""Any checkpoint (a run's, a resume.pt, an official release's) -> NAME.safetensors + NAME.json, shareable.

    python _tools/convert_ckpt.py CKPT [--config JSON] [--vocab JSON] [--out NAME.safetensors]

NAME.safetensors holds the state dict (safetensors: tensors only, loading it cannot run code); NAME.json holds
{"config": the model's config, "vocab": QA-OE answer texts (when known), "source", "sha256"}: all that
predict.py and api.load need beside it. The config is --config (for official checkpoints, e.g.
_data/args_msrvtt-retrieval.json), else the args.json beside CKPT; the vocab --vocab (txt_<task>.json or a list),
else the vocab.json beside CKPT. Prints the SHA-256 of the .safetensors file.
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import api  # noqa: E402
import model as violet  # noqa: E402


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def convert(ckpt, out=None, config=None, vocab=None):
    """-> (path of the .safetensors, the JSON written beside it)."""
    out = out or os.path.splitext(ckpt)[0] + '.safetensors'
    if not out.endswith('.safetensors'):
        raise SystemExit(f'--out must end with .safetensors, got {out}')
    cfg, _, where = api.find_config(ckpt, config)
    args = agent.load_args(where, base=cfg)  # every key checked before anything is written
    if vocab is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'vocab.json')
        vocab = beside if os.path.isfile(beside) else None
    vocab = api.read_vocab(vocab) if vocab is not None else None  # (before writing: a bad one left a .safetensors alone)
    if vocab is not None and len(vocab) < args['size_vocab']:
        raise ValueError(f'the answer vocabulary has {len(vocab)} entries, the model {args["size_vocab"]} classes '
                         f'(a class without an answer text: null in a JSON list)')
    sd = violet.read_ckpt(ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    agent.save_safetensors(sd, out)
    digest = sha256(out)
    meta = dict(config=cfg, source=os.path.basename(ckpt), sha256=digest)
    if vocab is not None:
        meta['vocab'] = vocab
    agent.save_json(meta, os.path.splitext(out)[0] + '.json')
    return out, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('ckpt')
    ap.add_argument('--config', default=None, help="the model's config (default: args.json beside CKPT)")
    ap.add_argument('--vocab', default=None, help='QA-OE answer texts: txt_<task>.json or a vocab.json list')
    ap.add_argument('--out', default=None, help='NAME.safetensors (default: beside CKPT)')
    opt = ap.parse_args()
    try:
        out, meta = convert(opt.ckpt, opt.out, opt.config, opt.vocab)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'convert_ckpt: {e}') from e
    print(f'{out}  sha256 {meta["sha256"]}')
    print(f'{os.path.splitext(out)[0]}.json: config' + (f', vocab ({len(meta["vocab"])} answers)' if 'vocab' in meta else ''))


if __name__ == '__main__':
    main()
