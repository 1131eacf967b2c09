"""The model's fast paths (the CLS-only last CT layer, dropped all-padding text columns, no mask when nothing is
padded, heads only at masked positions, video features shared by QA-MC options) against the plain computation the
original does: the whole [video ; text] sequence through transformers' own BERT encoder with the additive mask
(1 - mask) * -10000, every head at every position. Small random configs: batch 1-3, 1-6 frames, 32-160 px (odd
h and w after the VT too), non-square frames, 1-12 tokens, texts without padding, padded, and all padding."""
import pytest
import torch

import bench
import model

# (B, T, H, W, X, text): 'full' no padding, 'pad' each sample padded after its own length, 'allpad' one sample
# all padding (even its [CLS] slot), 'mixed' a full one beside padded ones
CASES = [(1, 1, 32, 32, 1, 'full'), (1, 2, 64, 64, 5, 'pad'), (2, 3, 96, 96, 7, 'allpad'),
         (3, 6, 64, 64, 12, 'mixed'), (2, 2, 160, 160, 4, 'full'), (2, 2, 64, 96, 6, 'mixed')]
SMALL = {'model_preset': 'toy', 'size_vocab': 9}  # bert-tiny: no dropout; toy VT: no drop path, no head dropout


def inputs(B, T, H, W, X, text, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(B, T, 3, H, W, generator=g)
    txt = torch.randint(1000, 2000, (B, X), generator=g)
    txt[:, 0] = 101
    n = {'full': [X] * B, 'pad': torch.randint(1, X + 1, (B,), generator=g).tolist(),
         'allpad': [0] + [max(X - 2, 1)] * (B - 1), 'mixed': [X] + [max(X // 2, 1)] * (B - 1)}[text]
    for i, k in enumerate(n):
        txt[i, k:] = 0
        if 1 < k:
            txt[i, k - 1] = 102
    return img, txt, (txt != 0).long()


def plain_cross(m, feat_img, mask_img, feat_txt, mask_txt):
    """The original's go_cross (bench.original_cross: transformers' BERT encoder, eager attention, additive mask)
    -> (last hidden state, per-layer attention probabilities)."""
    return bench.original_cross(m, feat_img, mask_img, feat_txt, mask_txt, attentions=True)


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (a - b).abs().max()


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return {cls.task_type: cls(SMALL) for cls in (model.VIOLET_Pretrain, model.VIOLET_QAMC, model.VIOLET_QAOE,
                                                  model.VIOLET_Retrieval)}


def modes(m, train, grad_ckpt=False):
    """eval, or train (no dropout in the small config, so the same numbers), optionally with grad_ckpt."""
    m.train(train)
    m.args['grad_ckpt'] = grad_ckpt
    for layer in m.enc_img.swin.layers:
        layer.grad_ckpt = grad_ckpt
    return torch.enable_grad() if grad_ckpt else torch.no_grad()


@pytest.mark.parametrize('case', CASES, ids=[f'B{c[0]}T{c[1]}_{c[2]}x{c[3]}_X{c[4]}_{c[5]}' for c in CASES])
@pytest.mark.parametrize('train, grad_ckpt', [(False, False), (True, False), (True, True)], ids=['eval', 'train', 'ckpt'])
def test_fast_paths_equal_the_plain_path(case, train, grad_ckpt, models):
    img, txt, mask = inputs(*case, seed=sum(case[:5]))
    B, X = txt.shape
    pre = models['pretrain']
    with modes(pre, train, grad_ckpt):
        feats = pre.go_feat(img, txt, mask)
        L_img = feats[0].shape[1]
        plain, att = plain_cross(pre, *feats)
        # go_cross: every position, and the CLS row alone (only=)
        close(pre.go_cross(*feats)[0], plain)
        close(pre.go_cross(*feats, only=L_img)[0][:, 0], plain[:, L_img])
        # fused_cls: trailing all-padding columns dropped (and the mask with them when nothing else is padded)
        close(pre.fused_cls(*feats), plain[:, L_img])
        close(pre.score(*feats), pre.fc(plain[:, L_img]).squeeze(-1))
        # the attended-masking statistic
        close(pre.get_att(img, txt, mask), torch.stack([a.mean(1) for a in att], 1).sum(dim=(1, 2)))
        # pretraining heads: at every position, and at chosen positions only
        g = torch.Generator().manual_seed(1)
        at_mtm, at_mvm = torch.rand(B, X, generator=g) < 0.5, torch.rand(B, L_img, generator=g) < 0.3
        at_mtm[0], at_mvm[0] = False, True  # a sample with no MLM target and one with every patch
        for at in ((None, None), (at_mtm, at_mvm)):
            torch.manual_seed(3)
            mtm, mvm, vtm, ans = pre(img, txt, mask, *at)
            torch.manual_seed(3)
            i_img, i_txt = model.vtm_pairs(B, min(B, 4), 'cpu')
            ref_mtm, ref_mvm = pre.fc_mtm(plain[:, L_img:]), pre.fc_mvm(plain[:, :L_img])
            close(mtm, ref_mtm if at[0] is None else ref_mtm[at[0]])
            close(mvm, ref_mvm if at[1] is None else ref_mvm[at[1]])
            fused = plain_cross(pre, feats[0][i_img], feats[1][i_img], feats[2][i_txt], feats[3][i_txt])[0]
            close(vtm, pre.fc(fused[:, L_img]).view(B, -1) / 0.05)
            assert torch.equal(ans, torch.zeros(B, dtype=torch.long))

    ret = models['retrieval']
    with modes(ret, train, grad_ckpt):
        f = ret.go_feat(img, txt, mask)
        i_img, i_txt = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
        fused = plain_cross(ret, f[0][i_img], f[1][i_img], f[2][i_txt], f[3][i_txt])[0]
        out, ans = ret(img, txt, mask)
        close(out, ret.fc(fused[:, L_img]).view(B, B) / 0.05)
        assert torch.equal(ans, torch.arange(B))

    qaoe = models['qaoe']
    with modes(qaoe, train, grad_ckpt):
        close(qaoe(img, txt, mask), qaoe.fc(plain_cross(qaoe, *qaoe.go_feat(img, txt, mask))[0][:, L_img]))

    qamc = models['qamc']
    with modes(qamc, train, grad_ckpt):
        O = 3
        opt_txt = torch.stack([txt.roll(k, dims=0) for k in range(O)], 1)  # [B, O, X]: other samples' texts
        opt_mask = (opt_txt != 0).long()
        f_img, m_img, f_txt, m_txt = qamc.go_feat(img.repeat_interleave(O, 0), opt_txt.flatten(0, 1), opt_mask.flatten(0, 1))
        ref = qamc.fc(plain_cross(qamc, f_img, m_img, f_txt, m_txt)[0][:, L_img]).view(B, O)
        close(qamc(img, opt_txt, opt_mask), ref)
    for m in models.values():
        modes(m, False)
