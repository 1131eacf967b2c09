"""Video Swin at the shapes the golden outputs do not cover (1-6 frames, 32-224 px, non-square frames, odd sizes
after patch merging, Swin-S's (8, 7, 7) window and the toy's (8, 4, 4)) against the original's algorithm written
out step by step: views and permutes for the window partition, the 27-region mask, the bias's top-left N x N
corner, padding that takes part in attention, the appended zero frame."""
import pytest
import torch
import torch.nn.functional as F

import bench
import model


def shrink(size, window, shift):
    window, shift = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return window, shift


def partition(x, w):  # [B, D, H, W, C] -> [B * windows, w0*w1*w2, C]
    B, D, H, W, C = x.shape
    x = x.view(B, D // w[0], w[0], H // w[1], w[1], W // w[2], w[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, w[0] * w[1] * w[2], C)


def reverse(x, w, B, D, H, W):
    x = x.view(B, D // w[0], H // w[1], W // w[2], w[0], w[1], w[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, -1)


def region_mask(D, H, W, w, s):
    img = torch.zeros(1, D, H, W, 1)
    cnt = 0
    for d in slice(-w[0]), slice(-w[0], -s[0]), slice(-s[0], None):
        for h in slice(-w[1]), slice(-w[1], -s[1]), slice(-s[1], None):
            for ww in slice(-w[2]), slice(-w[2], -s[2]), slice(-s[2], None):
                img[:, d, h, ww, :] = cnt
                cnt += 1
    m = partition(img, w).squeeze(-1)
    m = m.unsqueeze(1) - m.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def original_swin(swin, x):
    """[B, 3, T, H, W] -> [B, T, H/32, W/32, C], the original video_swin.py's order of operations."""
    W, H = x.shape[4], x.shape[3]
    if W % 4:
        x = F.pad(x, (0, 4 - W % 4))
    if H % 4:
        x = F.pad(x, (0, 0, 0, 4 - H % 4))
    x = swin.patch_embed.proj(F.pad(x, (0, 0, 0, 0, 0, 1)))
    B, C, D, Wh, Ww = x.shape
    x = swin.patch_embed.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(B, C, D, Wh, Ww)
    for layer in swin.layers:
        B, C, D, H, W = x.shape
        w, s = shrink((D, H, W), layer.window, layer.shift)
        x = x.permute(0, 2, 3, 4, 1)
        mask = region_mask(*[-(-n // k) * k for n, k in zip((D, H, W), w)], w, s)
        for blk in layer.blocks:
            bw, bs = shrink((D, H, W), blk.window, blk.shift)
            y = blk.norm1(x)
            pad = [(k - n % k) % k for n, k in zip((D, H, W), bw)]
            y = F.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
            Dp, Hp, Wp = y.shape[1:4]
            shifted = any(i > 0 for i in bs)
            if shifted:
                y = torch.roll(y, shifts=tuple(-i for i in bs), dims=(1, 2, 3))
            y = bench.original_window_attention(blk.attn, partition(y, bw), None, mask if shifted else None)
            y = reverse(y, bw, B, Dp, Hp, Wp)
            if shifted:
                y = torch.roll(y, shifts=tuple(bs), dims=(1, 2, 3))
            x = x + y[:, :D, :H, :W]
            x = x + blk.mlp(blk.norm2(x))
        if layer.downsample is not None:
            m = layer.downsample
            if H % 2 or W % 2:
                x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
            x = m.reduction(m.norm(x))
        x = x.permute(0, 4, 1, 2, 3)
    return swin.norm(x.permute(0, 2, 3, 4, 1))


SHAPES = [(1, 32, 32), (3, 96, 96), (6, 160, 160), (2, 64, 96), (4, 224, 224), (5, 128, 64)]


@pytest.mark.parametrize('window', [(8, 7, 7), (8, 4, 4)])
@pytest.mark.parametrize('T, H, W', SHAPES)
def test_swin_equals_the_originals_algorithm(window, T, H, W):
    torch.manual_seed(T * H + W)
    swin = model.SwinTransformer3D(dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=window, drop_path=0.0).eval()
    x = torch.rand(2, 3, T, H, W)
    with torch.no_grad():
        out, ref = swin(x), original_swin(swin, x)
    assert out.shape == (2, T, H // 32, W // 32, 64)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize('T, H, W', [(6, 160, 160), (5, 128, 64), (3, 96, 96)])
def test_swin_gradients_equal_the_originals_algorithm(T, H, W):
    """Training sees the same gradients as through the original's algorithm (rolls, partitions, padding cropped), for
    the input and every weight, at shapes with padding and shifted windows: the residual stream kept in window order
    (gathered between blocks, padded tokens carried along and zeroed before attention) changes the order of sums
    only. In float64, where that order leaves no trace (in float32 it moves weight gradients by about 1e-5 of their
    norm, through the cancellations of 8 blocks)."""
    torch.manual_seed(T + H + W)
    swin = model.SwinTransformer3D(dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=(8, 7, 7),
                                   drop_path=0.0).double()
    x = torch.rand(2, 3, T, H, W, dtype=torch.float64)
    grads = []
    for run in (swin, lambda y: original_swin(swin, y)):
        xi = x.clone().requires_grad_()
        swin.zero_grad()
        out = run(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads.append({'input': xi.grad, **{n: p.grad.clone() for n, p in swin.named_parameters()}})
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).norm() <= 1e-10 * grads[1][k].norm(), k
