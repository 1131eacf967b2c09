"""The deterministic weight formula that filled the original model for tests/golden/ (docs/violet.md#golden-outputs):
each float parameter from a hash of its name, uniform with std 0.02 (+1 for LayerNorm weights); and the key lists
of the original classes."""
import os
import zlib

import numpy as np
import torch

HERE = os.path.join(os.path.dirname(__file__), 'golden')
M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def read_keys(kind):
    """[(name, shape, dtype)] of the original state dict, in its order."""
    rows = []
    for line in open(os.path.join(HERE, f'keys_{kind}.tsv')):
        name, shape, dtype = line.rstrip('\n').split('\t')
        rows.append((name, tuple(int(s) for s in shape.split(',')), dtype))
    return rows


def formula(name, shape):
    n = int(np.prod(shape))
    seed = np.uint64(zlib.crc32(name.encode('utf-8')))
    with np.errstate(over='ignore'):
        z = np.arange(n, dtype=np.uint64) + seed * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / 2.0**24
    v = (2 * u - 1) * 0.02 * np.sqrt(3)
    parts = name.split('.')
    if parts[-1] == 'weight' and (parts[-2].startswith('norm') or parts[-2] == 'LayerNorm'):
        v = 1 + v
    return torch.from_numpy(v.reshape(shape).astype(np.float32))


def golden_state_dict(kind):
    """Float entries of the original layout filled by the formula (int64 index buffers are left out:
    they come from the architecture)."""
    sd = {}
    for name, shape, dtype in read_keys(kind):
        if dtype != 'float32':
            continue
        src = 'fc_mtm.predictions.decoder.bias' if name == 'fc_mtm.predictions.bias' else name  # one tensor, two names
        sd[name] = formula(src, shape)
    return sd
