"""DALL-E dVAE tokens of every frame: X.pkl (or X.tsv + X.lineidx) -> X_vq.pkl = {video_id: int16 [T, h, w]}
(docs/violet.md#data-formats). Each frame is decoded whole, padded to square and resized as the training input,
but to frame//32*8 px, with the original's own arithmetic (PIL: vq_input), mapped by map_pixels (x*(1-2*0.1)+0.1),
encoded, argmax over the 8192 logits: h = w = frame//32, one token per 32x32 patch of the training input.

    python _tools/extract_vq.py --path=_data/img_webvid2.5m_train_0 --frame=224 --encoder=_snapshot/encoder.pkl
    python _tools/extract_vq.py --path _data/img_webvid2.5m_train_{0,1,2} _data/img_webvid2.5m_val --out _data/vq_webvid2.5m.pkl

The encoder is the original's https://cdn.openai.com/dall-e/encoder.pkl (see the DALL-E package README,
https://github.com/openai/DALL-E).
"""
import argparse, io, os, pickle, sys

import numpy as np
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import int_at_least  # noqa: E402
from dataset import (IMAGE_ERRORS, DataError, WriteError, b64_bytes, image_error, load_pickle,  # noqa: E402
                     pil_pad_resize, rgb_array, write_pickle)  # plain-data pickles
from extract_tsv import read_tsv, usable_frames  # noqa: E402

LOGIT_LAPLACE_EPS = 0.1


def load_encoder(path, device='cpu'):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'DALL-E encoder not found at {path}: the original obtains it from '
                                'https://cdn.openai.com/dall-e/encoder.pkl (DALL-E package README, '
                                'https://github.com/openai/DALL-E); download it there and pass --encoder, or pretrain without VQ '
                                'tokens: "mvm_target": "pixel" (VIOLETv2\'s pixel MVM target)')
    import dall_e  # noqa: F401  the pickle refers to dall_e's classes
    # encoder.pkl is a pickled nn.Module, not a state dict: unpickling runs code, so load only trusted files
    enc = torch.load(path, map_location=device, weights_only=False)
    return enc.to(device).eval()


def vq_input(b64, size):
    """A base64 frame -> float [3, size, size] in [0, 1], to the bit as the original made the encoder's input: PIL
    decodes it, zero rows (columns) of (long - short) // 2 on both sides of the short one, PIL's bilinear resize to
    size x size, then to a tensor. The training input (dataset.b64_to_img) is within 1/255 of this, about 0.1 % of
    values 1/255 apart; a token is a label, so its input keeps the original's arithmetic (the encoder, not this,
    is the cost). Frames that are not RGB (greyscale, CMYK) are made RGB first (the original's encoder failed on
    them); 16-bit grey ones are scaled to 8 bits as training reads them (dataset.rgb_array)."""
    return TVF.to_tensor(pil_pad_resize(rgb_array(Image.open(io.BytesIO(b64_bytes(b64)))), size))


@torch.no_grad()
def encode_frames(encoder, frames_b64, frame=224, device='cpu', batch=64, names=None):
    """[b64] -> int16 [len, frame//32, frame//32] token ids. names: what to call each frame in the DataError for one
    that cannot be decoded (default its index)."""
    size = frame // 32 * 8
    out = []
    for i in range(0, len(frames_b64), batch):
        x = []
        for j, b in enumerate(frames_b64[i:i + batch], i):
            try:
                x.append(vq_input(b, size))
            except IMAGE_ERRORS as e:
                raise DataError(f'{names[j] if names else f"frame {j}"}: cannot decode image ({image_error(e)})') from e
        x = torch.stack(x).to(device)
        x = (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS  # dall_e.map_pixels
        out.append(encoder(x).argmax(1).cpu())
    return torch.cat(out).numpy().astype(np.int16)


def encode_videos(encoder, pkl, frame=224, device='cpu', batch=64, progress=True):
    """{vid: [b64] x T} -> {vid: int16 [T, h, w]}; frames of several videos share a batch."""
    vids = list(pkl)
    out, bar = {}, tqdm(total=len(vids), ascii=True, disable=not progress)
    group = max(1, batch // max(1, len(pkl[vids[0]]) if vids else 1))
    for i in range(0, len(vids), group):
        chunk = vids[i:i + group]
        flat = [b for v in chunk for b in pkl[v]]
        names = [f'video "{v}" frame {k}' for v in chunk for k in range(len(pkl[v]))]
        tokens = encode_frames(encoder, flat, frame, device, batch, names)
        k = 0
        for v in chunk:
            out[v] = tokens[k:k + len(pkl[v])]
            k += len(pkl[v])
        bar.update(len(chunk))
    bar.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', required=True, nargs='+',
                        help='X: reads X.pkl (else X.tsv + X.lineidx), writes X_vq.pkl; several (the train parts and '
                             'val of a dataset): one --out holding all their videos (vq_<dataset>.pkl)')
    parser.add_argument('--frame', type=int_at_least(32), default=224, help='the training size_img')
    parser.add_argument('--encoder', default='encoder.pkl')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int_at_least(1), default=64, help='frames per encoder call')
    parser.add_argument('--out', default=None, help='output file (default X_vq.pkl)')
    args = parser.parse_args()
    if len(args.path) > 1 and not args.out:
        sys.exit('several --path: give --out (the vq_<dataset>.pkl that holds all their videos)')
    try:
        encoder = load_encoder(args.encoder, args.device)
    except FileNotFoundError as e:
        sys.exit(str(e))
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:  # (not the encoder.pkl)
        sys.exit(f'--encoder {args.encoder}: not the DALL-E encoder.pkl ({type(e).__name__}: '
                 f'{str(e).splitlines()[0] if str(e) else ""})')
    vq = {}
    for path in args.path:
        if os.path.isfile(path + '.pkl'):
            src = path + '.pkl'
        elif os.path.isfile(path + '.tsv') and os.path.isfile(path + '.lineidx'):
            src = path + '.tsv'
        else:
            sys.exit(f'missing {path}.pkl (or {path}.tsv + .lineidx)')
        try:
            pkl = load_pickle(src) if src.endswith('.pkl') else read_tsv(src, path + '.lineidx')
            vq.update(encode_videos(encoder, usable_frames(pkl, src), args.frame, args.device, args.batch))
        except DataError as e:  # (a pkl that is not one, a damaged index, a frame that is not an image: named)
            sys.exit(str(e) if str(e).startswith(path) else f'{src}: {e}')
    path_out = args.out or args.path[0] + '_vq.pkl'
    try:
        write_pickle(vq, path_out)  # whole or not at all
    except WriteError as e:
        sys.exit(str(e))
    print(f'{path_out}: {len(vq)} videos, tokens [T, {args.frame // 32}, {args.frame // 32}]')


if __name__ == '__main__':
    main()
