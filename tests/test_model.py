"""model.py: the original's key layout, numbers equal to the golden outputs, gradients, clear errors."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import bench
import golden_weights as gw
import model

SMALL = {'model_preset': 'toy', 'size_vocab': 7}


@pytest.fixture(scope='module')
def bert_base_dir(tmp_path_factory):
    """bert-base-uncased's architecture (BertConfig defaults) without weights: no network needed."""
    d = tmp_path_factory.mktemp('bert-base')
    transformers.BertConfig().save_pretrained(d)
    return str(d)


def full_args(bert_base_dir):
    return {'txt_backbone': bert_base_dir, 'path_vt': '', 'size_vocab': 1000}


KINDS = {'pretrain': 'pretrain', 'qamc': 'qamc', 'qaoe': 'qaoe', 'retrieval': 'retrieval'}


@pytest.fixture(scope='module')
def golden_models(bert_base_dir, tmp_path_factory):
    """Each full-size model with the golden weights loaded through load_ckpt from a file."""
    out = {}
    for kind in KINDS:
        m = model.MODELS[kind](full_args(bert_base_dir)).eval()
        path = tmp_path_factory.mktemp('ckpt') / f'golden_{kind}.pt'
        torch.save(gw.golden_state_dict(kind), path)
        not_loaded, unexpected = m.load_ckpt(str(path))
        assert not_loaded == [] and unexpected == []
        out[kind] = m
    return out


@pytest.mark.parametrize('kind', KINDS)
def test_key_layout_equals_original(kind, golden_models):
    own = {k: (tuple(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in golden_models[kind].state_dict().items()}
    ref = {name: (shape, dtype) for name, shape, dtype in gw.read_keys(kind)}
    assert own == ref


def golden(case):
    g = np.load(os.path.join(gw.HERE, f'{case}.npz'))
    return {k: torch.from_numpy(v) for k, v in g.items()}


def close(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < tol


@pytest.mark.parametrize('case', ['g64', 'g224'])
def test_golden_parity(case, golden_models):
    g = golden(case)
    img, txt, mask = g['in_img'], g['in_txt'], g['in_mask']
    pre = golden_models['pretrain']
    with torch.no_grad():
        feat_img, mask_img, feat_txt, mask_txt = pre.go_feat(img, txt, mask)
        close(feat_img, g['feat_img']), close(feat_txt, g['feat_txt'])
        assert torch.equal(mask_img, g['mask_img'])
        cross, att = pre.go_cross(feat_img, mask_img, feat_txt, mask_txt)
        assert att is None
        close(cross, g['cross'])
        close(pre.get_att(img, txt, mask), g['att'])

        out_mtm, out_mvm, out_vtm, ans_vtm = pre(img, txt, mask)
        for out, name in [(out_mtm, 'mtm'), (out_mvm, 'mvm')]:
            close(out[..., :64], g[f'{name}_logits_head'])
            close(out.logsumexp(-1), g[f'{name}_logsumexp'])
            assert torch.equal(out.argmax(-1), g[f'{name}_argmax'])
        close(out_vtm, g['vtm'], 1e-3)  # logits / 0.05 magnify the 1e-5 agreement 20 times
        # the MLM / MVM heads on chosen positions alone (training passes the masked ones): the golden rows
        at_mtm = torch.arange(txt.numel()).view(txt.shape) % 3 == 1
        at_mvm = torch.arange(mask_img.numel()).view(mask_img.shape) % 5 == 2
        sel_mtm, sel_mvm, _, _ = pre(img, txt, mask, at_mtm, at_mvm)
        for out, at, name in [(sel_mtm, at_mtm, 'mtm'), (sel_mvm, at_mvm, 'mvm')]:
            close(out[:, :64], g[f'{name}_logits_head'][at])
            assert torch.equal(out.argmax(-1), g[f'{name}_argmax'][at])
        assert torch.equal(ans_vtm, torch.zeros(2, dtype=torch.long))

        qamc_mask = (g['qamc_txt'] != 0).long()
        close(golden_models['qamc'](img, g['qamc_txt'], qamc_mask), g['qamc'])
        qaoe = golden_models['qaoe'](img, txt, mask)
        close(qaoe, g['qaoe'])
        assert torch.equal(qaoe.argmax(-1), torch.from_numpy(np.load(os.path.join(gw.HERE, f'{case}.npz'))['qaoe']).argmax(-1))
        out, ans = golden_models['retrieval'](img, txt, mask)
        close(out, g['retrieval'], 1e-3)
        assert torch.equal(ans, torch.arange(2))


def small_batch(B=3, T=3, S=64, X=8):
    torch.manual_seed(0)
    img = torch.rand(B, T, 3, S, S)
    txt = torch.randint(1000, 2000, (B, X))
    txt[:, 0], txt[:, -1] = 101, 102
    return img, txt, torch.ones_like(txt)


def assert_grads(m, loss):
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad
    return missing


def test_heads_backpropagate():
    img, txt, mask = small_batch()
    ce = torch.nn.functional.cross_entropy
    m = model.VIOLET_Pretrain(SMALL).train()
    mtm, mvm, vtm, ans = m(img, txt, mask)
    missing = assert_grads(m, ce(mtm.flatten(0, 1), txt.flatten()) + ce(mvm.flatten(0, 1), torch.zeros(mvm.shape[:2], dtype=torch.long).flatten()) + ce(vtm, ans))
    # emb_pos rows beyond 1+h*w and token types other than 0 are never used
    assert missing == []
    m = model.VIOLET_QAMC(SMALL).train()
    assert assert_grads(m, ce(m(img, txt[:, None].repeat(1, 5, 1), mask[:, None].repeat(1, 5, 1)), torch.tensor([0, 1, 2]))) == []
    m = model.VIOLET_QAOE(SMALL).train()
    assert assert_grads(m, ce(m(img, txt, mask), torch.tensor([0, 6, 3]))) == []
    m = model.VIOLET_Retrieval(SMALL).train()
    assert assert_grads(m, ce(*m(img, txt, mask))) == []


def test_sdpa_equals_explicit_attention_and_grad_ckpt():
    img, txt, mask = small_batch()
    mask[1, 5:] = 0
    m = model.VIOLET_Pretrain({**SMALL, 'vt_drop_path': 0.2}).eval()
    with torch.no_grad():
        f = m.go_feat(img, txt, mask)
        a, _ = m.go_cross(*f)
        b, att = m.go_cross(*f, output_attentions=True)
    assert (a - b).abs().max() < 1e-5 and len(att) == 2 and att[0].shape == (3, 2, a.shape[1], a.shape[1])
    assert att[0][1, :, :, -3:].abs().max() == 0  # padded text is never attended
    # activation checkpointing changes memory, not numbers: the same gradients in train mode with drop-path (the
    # recomputation must replay the same random drops)
    assert m.enc_img.swin.layers[0].blocks[1].drop_path.drop_prob > 0
    m.train()
    grads = []
    for ckpt in (False, True):
        m.args['grad_ckpt'] = ckpt
        for layer in m.enc_img.swin.layers:
            layer.grad_ckpt = ckpt
        m.zero_grad()
        torch.manual_seed(1)
        out_mtm, out_mvm, out_vtm, _ = m(img, txt, mask)
        (out_mtm.square().mean() + out_mvm.square().mean() + out_vtm.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(m.parameters()))
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n


def test_vtm_pairs():
    """For video i: text i first, then O-1 distinct other texts; the same pairs under the same seed."""
    for B, O in ((3, 3), (4, 4), (9, 4)):
        draws = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            i_img, i_txt = model.vtm_pairs(B, O, 'cpu')
            assert torch.equal(i_img, torch.arange(B).repeat_interleave(O))
            txt = i_txt.view(B, O)
            assert torch.equal(txt[:, 0], torch.arange(B))
            for i in range(B):
                neg = txt[i, 1:].tolist()
                assert i not in neg and len(set(neg)) == O - 1 and all(0 <= j < B for j in neg)
            draws.append(txt)
        assert torch.equal(draws[0], draws[1])
    # every other text is drawn as a negative, none favoured much (O-1 of B-1 others, uniformly)
    torch.manual_seed(2)
    counts = torch.zeros(9, 9)
    for _ in range(300):
        txt = model.vtm_pairs(9, 4, 'cpu')[1].view(9, 4)
        counts.scatter_add_(1, txt[:, 1:], torch.ones(9, 3))
    off = counts[~torch.eye(9, dtype=torch.bool)]
    assert counts.diag().sum() == 0 and (off - 300 * 3 / 8).abs().max() < 40


def test_train_mode_attention_is_after_dropout(tmp_path):
    """In train mode the attention probabilities (attended masking's statistic) are the ones after attention
    dropout, as transformers' own eager attention returns them: same seed, same numbers."""
    from transformers.models.bert import modeling_bert
    cfg = transformers.BertConfig.from_pretrained('./_data/bert-tiny')
    cfg.attention_probs_dropout_prob = 0.3
    cfg.save_pretrained(tmp_path)
    m = model.VIOLET_Pretrain({**SMALL, 'txt_backbone': str(tmp_path)}).train()
    img, txt, mask = small_batch()
    mask[1, 5:] = 0
    with torch.no_grad():
        f = m.go_feat(img, txt, mask)
        torch.manual_seed(5)
        _, att = m.go_cross(*f, output_attentions=True)
        sa = m.trsfr.layer[0].attention.self
        x = torch.cat([f[0], f[2]], 1)
        q, k, v = (lin(x).view(3, x.shape[1], 2, -1).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        keep = torch.cat([f[1], f[3]], 1)[:, None, None, :].bool()
        additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        torch.manual_seed(5)
        _, ref = modeling_bert.eager_attention_forward(sa, q, k, v, additive, dropout=0.3, scaling=q.shape[-1] ** -0.5)
    dropped = (ref == 0) & keep.expand_as(ref)
    assert 0.2 < dropped.float().mean() < 0.4  # dropout was active
    assert torch.allclose(att[0], ref, atol=1e-6)


def test_projection_when_widths_differ():
    args = {**SMALL, 'vt_dim': 8}  # VT out 64, BERT hidden 128
    m = model.VIOLET_Retrieval(args)
    assert m.enc_img.proj.weight.shape == (128, 64)
    img, txt, mask = small_batch()
    assert m.go_feat(img, txt, mask)[0].shape == (3, 3 * 5, 128)
    same = model.VIOLET_Retrieval(SMALL)
    assert isinstance(same.enc_img.proj, torch.nn.Identity) and not any('proj' in k for k in same.enc_img.state_dict()
                                                                         if not k.startswith('swin.'))


def test_head_dropout_key():
    assert model.DEFAULTS['head_dropout'] == 0.1  # the original's
    assert model.VIOLET_QAOE({**SMALL, 'head_dropout': 0.1}).fc[0].p == 0.1  # a given key wins over the preset's
    m = model.VIOLET_Pretrain(SMALL)  # the toy preset's 0.0
    assert m.fc[0].p == 0.0 and m.fc_mvm[0].p == 0.0


def test_toy_preset():
    """The preset fills what the dict leaves out; DEFAULTS what the preset does not name; unknown names refused."""
    m = model.VIOLET_Retrieval({**SMALL, 'vt_dim': 8})
    assert m.args['vt_window'] == [8, 4, 4] and m.args['vt_dim'] == 8 and m.args['mvm_target'] == 'vq'
    assert m.enc_img.swin.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 7 * 7, 1)
    assert m.hidden_size == 128 and len(m.trsfr.layer) == 2  # bert-tiny
    with pytest.raises(ValueError, match="model_preset: unknown preset 'tiny' \\(known: toy\\)"):
        model.VIOLET_Retrieval({'model_preset': 'tiny'})


def test_pixel_mvm_head():
    m = model.VIOLET_Pretrain({**SMALL, 'mvm_target': 'pixel'})
    assert m.fc_mvm[3].out_features == 3 * 32 * 32


@pytest.mark.parametrize('shape, txt_b, msg', [
    ((1, 7, 3, 64, 64), 1, 'at most 6'),
    ((1, 2, 3, 64, 80), 1, 'multiple of 32'),
    ((1, 2, 3, 480, 64), 1, 'at most 448'),
    ((2, 2, 3, 64, 64), 3, 'batch mismatch'),
    ((2, 3, 64, 64), 2, r'\[B, T, 3, H, W\]'),
])
def test_bad_input_is_named(shape, txt_b, msg):
    m = model.VIOLET_QAOE(SMALL)
    txt = torch.ones(txt_b, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=msg):
        m(torch.rand(shape), txt, txt)


def test_load_ckpt_reports_and_errors(tmp_path):
    m = model.VIOLET_Retrieval(SMALL)
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nope.pt'):
        m.load_ckpt(str(tmp_path / 'nope.pt'))
    os.makedirs(tmp_path / 'run.pt')  # (was 'checkpoint not found')
    with pytest.raises(model.CheckpointError, match=f"^{tmp_path}/run.pt is a folder, not a checkpoint file \\(a run's "):
        m.load_ckpt(str(tmp_path / 'run.pt'))
    for epoch in (2, 10, 1):  # a run's folder: its newest checkpoint is named (by time: epoch 10 sorts before 2)
        torch.save({}, tmp_path / 'run.pt' / f'ckpt_violet_x_{epoch}.pt')
        os.utime(tmp_path / 'run.pt' / f'ckpt_violet_x_{epoch}.pt', (epoch, epoch))
    with pytest.raises(model.CheckpointError, match=f"^{tmp_path}/run.pt is a folder, not a checkpoint file \\(the "
                                                    f"newest in it is {tmp_path}/run.pt/ckpt_violet_x_10.pt\\)$"):
        m.load_ckpt(str(tmp_path / 'run.pt'))
    pre = model.VIOLET_Pretrain(SMALL)
    sd = pre.state_dict()
    sd['enc_txt.emb_txt.position_ids'] = torch.arange(512)[None]  # what old checkpoints carry
    torch.save(sd, tmp_path / 'pre.pt')
    not_loaded, unexpected = m.load_ckpt(str(tmp_path / 'pre.pt'))
    assert not_loaded == [] and all(k.startswith(('fc_mtm.', 'fc_mvm.')) for k in unexpected) and unexpected
    assert torch.equal(m.trsfr.layer[0].attention.self.query.weight, pre.trsfr.layer[0].attention.self.query.weight)
    assert torch.equal(m.fc[1].weight, pre.fc[1].weight)  # the VTM head initialises the retrieval head
    qaoe = model.VIOLET_QAOE({**SMALL, 'size_vocab': 5})
    not_loaded, _ = qaoe.load_ckpt(str(tmp_path / 'pre.pt'))
    assert not_loaded == ['fc.3.bias', 'fc.3.weight']  # shape differs: the model keeps its own


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name.replace('-', '_'), os.path.join('_tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_video_swin_and_path_vt(tmp_path, capsys):
    swin = model.SwinTransformer3D(16, [2, 2, 2, 2], [1, 2, 4, 8], [8, 4, 4])  # the toy preset's
    mm = {'meta': {'epoch': 30}, 'state_dict': {**{'backbone.' + k: v for k, v in swin.state_dict().items()},
                                                'cls_head.fc_cls.weight': torch.rand(400, 128)}}
    torch.save(mm, tmp_path / 'k400.pth')
    out = load_tool('convert_video-swin').convert(str(tmp_path / 'k400.pth'), str(tmp_path / 'vt.pt'))
    assert set(out) == set(swin.state_dict())
    m = model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'vt.pt')})
    for k, v in swin.state_dict().items():
        assert torch.equal(m.enc_img.swin.state_dict()[k], v)
    assert 'VT: loaded' in capsys.readouterr().out
    # a path that is set but missing stops the run; only '' asks for a random VT
    absent = str(tmp_path / 'absent.pt')
    with pytest.raises(FileNotFoundError, match=f'^path_vt: no Video Swin weights at {absent} .*_tools/convert_video-swin.py'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': absent})
    model.VIOLET_Retrieval(SMALL)
    assert 'VT: path_vt is "": the video encoder starts random' in capsys.readouterr().out
    # ... unless path_ckpt holds every enc_img.swin.* weight (official downstream checkpoints): then it fills the VT
    full = model.VIOLET_Retrieval(SMALL).state_dict()
    torch.save(full, tmp_path / 'full.pt')
    m = model.VIOLET_Retrieval({**SMALL, 'path_vt': absent, 'path_ckpt': str(tmp_path / 'full.pt')})
    assert f'no file at {absent}; the Video Swin weights come from' in capsys.readouterr().out
    assert m.load_ckpt(str(tmp_path / 'full.pt'))[0] == []
    torch.save({k: v for k, v in full.items() if k != 'enc_img.swin.norm.weight'}, tmp_path / 'part.pt')
    with pytest.raises(FileNotFoundError, match=f'no Video Swin weights at {absent} .* lacks 1 of them, e.g. norm.weight$'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': absent, 'path_ckpt': str(tmp_path / 'part.pt')})
    bad = model.SwinTransformer3D(8, [2, 2, 2, 2], [1, 2, 4, 8]).state_dict()
    torch.save(bad, tmp_path / 'bad.pt')
    with pytest.raises(model.CheckpointError, match=rf'^path_vt: {tmp_path}/bad.pt: Video Swin weights do not fit the '
                                                    r'configured VT \(.*\) \(vt_dim, vt_depths'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'bad.pt')})
    # the Kinetics file itself, not converted: said so
    with pytest.raises(model.CheckpointError, match=r'an unconverted Video Swin checkpoint \("backbone." keys\): convert '
                                                    r'it with _tools/convert_video-swin.py$'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'k400.pth')})


def test_load_ckpt_need(tmp_path, capsys):
    """need='all' (evaluation) wants every key, 'encoders' (training) every encoder key, 'any' whatever fits;
    a need not met is an error listing the keys, and the model is left untouched."""
    m = model.VIOLET_Retrieval(SMALL)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    wrong = {k: torch.zeros(*v.shape, 2) for k, v in m.state_dict().items()}  # every tensor of another shape
    torch.save(wrong, tmp_path / 'wrong.pt')
    for need in ('all', 'encoders', 'any'):  # (even 'any' wants something loaded)
        with pytest.raises(model.CheckpointError, match=r"wrong.pt: none of the file's \d+ keys fits the model \("):
            m.load_ckpt(str(tmp_path / 'wrong.pt'), need)
    torch.save({**wrong, 'fc.3.bias': before['fc.3.bias'] + 1}, tmp_path / 'wrong.pt')  # all but one
    n = sum(not k.endswith('relative_position_index') for k in wrong)
    for need in ('all', 'encoders'):
        with pytest.raises(model.CheckpointError) as e:
            m.load_ckpt(str(tmp_path / 'wrong.pt'), need)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'wrong.pt'}: ")
        assert 'enc_img.emb_cls (' in msg and 'in the file, [1, 1, 1, 128] in the model)' in msg
        assert f'... and {(n - 1 if need == "all" else n - 4) - 8} more' in msg  # 'encoders': the 4 fc keys aside
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    misfit = sorted(k for k in wrong if not k.endswith('relative_position_index') and k != 'fc.3.bias')
    assert m.load_ckpt(str(tmp_path / 'wrong.pt'), 'any') == (misfit, misfit)
    assert torch.equal(m.state_dict()['fc.3.bias'], before['fc.3.bias'] + 1)
    # a checkpoint without the head: fine for training (reported), an error for evaluation
    no_head = {k: v for k, v in model.VIOLET_Retrieval(SMALL).state_dict().items() if not k.startswith('fc.')}
    torch.save(no_head, tmp_path / 'no_head.pt')
    assert m.load_ckpt(str(tmp_path / 'no_head.pt'), 'encoders')[0] == ['fc.1.bias', 'fc.1.weight', 'fc.3.bias', 'fc.3.weight']
    with pytest.raises(model.CheckpointError, match=r"no_head.pt: 4 of the model's \d+ keys are missing from the file "
                                                    r"or of another shape \(need=all\): fc.1.bias \(missing\), "):
        m.load_ckpt(str(tmp_path / 'no_head.pt'), 'all')
    capsys.readouterr()
    # a checkpoint whose run folder says it comes from another task: loaded, with a warning naming both
    (tmp_path / 'args.json').write_text('{"type": "qamc", "task": "tgif-action"}')
    torch.save(model.VIOLET_QAMC(SMALL).state_dict(), tmp_path / 'qamc.pt')
    assert model.VIOLET_Retrieval({**SMALL, 'task': 'msrvtt-retrieval'}).load_ckpt(str(tmp_path / 'qamc.pt'), 'all') == ([], [])
    assert (f"warning: {tmp_path / 'qamc.pt'} comes from a qamc tgif-action run ({tmp_path / 'args.json'}), "
            'used here for retrieval msrvtt-retrieval') in capsys.readouterr().out
    model.VIOLET_QAMC({**SMALL, 'task': 'tgif-action'}).load_ckpt(str(tmp_path / 'qamc.pt'), 'all')
    assert 'warning' not in capsys.readouterr().out


def test_tied_bias_under_one_name_loads(tmp_path):
    """fc_mtm's bias and decoder bias are one tensor (the original's too); a file that keeps one name of it
    (safetensors' save_model writes shared tensors once) fills both, where need='all' refused it as missing."""
    src = model.VIOLET_Pretrain(SMALL)
    assert src.tied_keys() == {'fc_mtm.predictions.bias': 'fc_mtm.predictions.decoder.bias',
                               'fc_mtm.predictions.decoder.bias': 'fc_mtm.predictions.bias'}
    safetensors.torch.save_model(src, str(tmp_path / 'one_name.safetensors'))
    with safetensors.safe_open(str(tmp_path / 'one_name.safetensors'), 'pt') as f:
        assert len(set(src.state_dict()) - set(f.keys())) == 1
    dst = model.VIOLET_Pretrain(SMALL)
    assert dst.load_ckpt(str(tmp_path / 'one_name.safetensors'), 'all') == ([], [])
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_unreadable_checkpoints_are_named(tmp_path):
    m = model.VIOLET_Retrieval(SMALL)
    torch.save(m.state_dict(), tmp_path / 'good.pt')
    raw = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'junk.pt').write_bytes(b'<html>not found</html>')
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'raw.pkl').write_bytes(__import__('pickle').dumps({'fc.1.weight': [1.0]}))
    torch.save({'model': m.state_dict(), 'obj': np.random.default_rng(0)}, tmp_path / 'object.pt')
    torch.save({}, tmp_path / 'nothing.pt')
    cases = {'nothing.pt': 'an empty state dict',
             'cut.pt': 'truncated or corrupt PyTorch checkpoint (was its writing interrupted?): RuntimeError: ',
             'junk.pt': "not a PyTorch checkpoint (expected a file written by torch.save; it starts with b'<html>no')",
             'empty.pt': 'not a PyTorch checkpoint (expected a file written by torch.save; an empty file)',
             'raw.pkl': 'not a PyTorch checkpoint (expected a file written by torch.save; a raw pickle)',
             'object.pt': 'holds objects other than tensors and plain containers, which are not read'}
    for name, msg in cases.items():
        with pytest.raises(model.CheckpointError) as e:
            m.load_ckpt(str(tmp_path / name), 'any')
        assert str(e.value).startswith(f'{tmp_path / name}: {msg}'), str(e.value)
    for cut in (3000, 5000, 20000, 60000):  # (cut in its first 64 KB: torch's zip reader raised a bare OSError)
        (tmp_path / 'cut.pt').write_bytes(raw[:cut])
        with pytest.raises(model.CheckpointError, match=r'cut.pt: truncated or corrupt PyTorch checkpoint \(was its '):
            m.load_ckpt(str(tmp_path / 'cut.pt'), 'any')
    with pytest.raises(model.CheckpointError, match=r'^path_vt: .*cut.pt: truncated'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'cut.pt')})  # the Video Swin weights too


def test_checkpoint_values_that_would_load_wrong_are_named(tmp_path):
    """Tensors of the right shape but integers or booleans for float weights (cast in silence), or NaN: loaded, and an
    evaluation reported numbers of those weights. A key that is not a str, and Video Swin weights that are not a dict
    of tensors: tracebacks."""
    m = model.VIOLET_Retrieval(SMALL)
    sd = m.state_dict()
    key = 'trsfr.layer.0.attention.self.query.weight'
    for name, value, why in [('int', sd[key].long(), 'torch.int64 in the file, torch.float32 in the model'),
                             ('bool', sd[key] > 0, 'torch.bool in the file, torch.float32 in the model'),
                             ('nan', sd[key].clone().fill_(float('nan')), 'NaN or infinite values in the file')]:
        torch.save({**sd, key: value}, tmp_path / f'{name}.pt')
        with pytest.raises(model.CheckpointError, match=rf'{name}.pt: 1 of the model.s \d+ keys are missing from the file '
                                                        rf'or of another shape \(need=all\): {key} \({why}\)'):
            model.VIOLET_Retrieval(SMALL).load_ckpt(str(tmp_path / f'{name}.pt'), 'all')
    assert model.VIOLET_Retrieval(SMALL).load_ckpt(str(tmp_path / 'nan.pt'), 'any')[0] == [key]  # not loaded, said
    torch.save({**sd, 1: torch.zeros(1)}, tmp_path / 'intkey.pt')
    with pytest.raises(model.CheckpointError, match=r'intkey.pt: key 1 is a int: a state dict is named by str keys$'):
        model.VIOLET_Retrieval(SMALL).load_ckpt(str(tmp_path / 'intkey.pt'), 'all')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(model.CheckpointError, match=r'^path_vt: .*list.pt: holds a list, not a state dict of tensors$'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'list.pt')})
    vt = {k.removeprefix('enc_img.swin.'): v for k, v in sd.items() if k.startswith('enc_img.swin.')}
    vt_key = next(k for k in vt if k.endswith('weight'))
    torch.save({**vt, vt_key: 3}, tmp_path / 'vt.pt')
    with pytest.raises(model.CheckpointError, match=rf'^path_vt: .*vt.pt: Video Swin weights do not fit the configured VT '
                                                    rf'\(1 keys .* e.g. {vt_key} \(a int in the file, not a tensor\)\)'):
        model.VIOLET_Retrieval({**SMALL, 'path_vt': str(tmp_path / 'vt.pt')})


def test_convert_video_swin_reads_without_running_code(tmp_path):
    """weights_only first (numpy values in the metadata allowed); other objects only with --trust-pickle."""
    import argparse
    swin = model.SwinTransformer3D(16, [2, 2, 2, 2], [1, 2, 4, 8])
    sd = {'backbone.' + k: v for k, v in swin.state_dict().items()}
    tool = load_tool('convert_video-swin')
    torch.save({'meta': {'epoch': 30, 'hook': np.float64(0.5), 'x': np.arange(3)}, 'state_dict': sd}, tmp_path / 'np.pth')
    assert set(tool.convert(str(tmp_path / 'np.pth'), str(tmp_path / 'vt.pt'))) == set(swin.state_dict())
    torch.save({'meta': {'cfg': argparse.Namespace(lr=1)}, 'state_dict': sd}, tmp_path / 'obj.pth')
    with pytest.raises(SystemExit, match=r'obj.pth: holds objects other than tensors and plain containers, which are '
                                         r'not read \(reading them could run code\): WeightsUnpickler error: Unsupported '
                                         r'global: GLOBAL argparse.Namespace .*--trust-pickle'):
        tool.convert(str(tmp_path / 'obj.pth'), str(tmp_path / 'vt2.pt'))
    assert not os.path.exists(tmp_path / 'vt2.pt')
    assert set(tool.convert(str(tmp_path / 'obj.pth'), str(tmp_path / 'vt2.pt'), trust_pickle=True)) == set(swin.state_dict())
    # not a torch file, or one cut short: named as such (not 'objects that weights_only does not read', nor a traceback)
    (tmp_path / 'page.pth').write_text('<html>404 Not Found</html>')  # a failed download saved as the file
    with pytest.raises(SystemExit, match=r"^convert_video-swin: .*page.pth: not a PyTorch checkpoint \(expected a file "
                                         r"written by torch.save; it starts with b'<html>40'\)$"):
        tool.convert(str(tmp_path / 'page.pth'), str(tmp_path / 'vt3.pt'))
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'np.pth').read_bytes()[:3000])
    with pytest.raises(SystemExit, match=r'^convert_video-swin: .*cut.pth: truncated or corrupt PyTorch checkpoint'):
        tool.convert(str(tmp_path / 'cut.pth'), str(tmp_path / 'vt3.pt'))
    assert not os.path.exists(tmp_path / 'vt3.pt')


@pytest.mark.parametrize('lengths', [(8, 5, 3), (4, 4, 4), (8, 8, 8)])
def test_score_drops_shared_padding_exactly(lengths):
    """score() cuts the text columns that are padding in every pair and runs without a mask when none is left:
    the same scores as the full padded sequence through the masked cross-encoder."""
    img, txt, mask = small_batch()
    for i, n in enumerate(lengths):
        txt[i, n - 1], txt[i, n:], mask[i, n:] = 102, 0, 0
    m = model.VIOLET_Retrieval(SMALL).eval()
    with torch.no_grad():
        feat_img, mask_img, feat_txt, mask_txt = m.go_feat(img, txt, mask)
        out, _ = m.go_cross(feat_img, mask_img, feat_txt, mask_txt)
        full = m.fc(out[:, feat_img.shape[1]]).squeeze(-1)
        assert torch.allclose(m.score(feat_img, mask_img, feat_txt, mask_txt), full, atol=1e-5)
    qa = model.VIOLET_QAOE(dict(SMALL, size_vocab=7)).eval()  # the QA-OE answers share fused_cls
    with torch.no_grad():
        feat_img, mask_img, feat_txt, mask_txt = qa.go_feat(img, txt, mask)
        out, _ = qa.go_cross(feat_img, mask_img, feat_txt, mask_txt)
        assert torch.allclose(qa.answer_logits(feat_img, mask_img, feat_txt, mask_txt), qa.fc(out[:, feat_img.shape[1]]),
                              atol=1e-5)


@pytest.mark.skipif(not (shutil.which('g++') or shutil.which('c++')), reason='torch.compile on CPU needs a C++ compiler')
def test_compile_blocks_keeps_numbers_and_keys():
    """compile: true (compile_blocks: each VT block and the CT layer through torch.compile, in place): the eager
    model's scores and QA-OE answers (padded text, so the CLS-only last layer and the mask both run compiled), and
    the same state-dict keys, so checkpoints load and save as before."""
    img, txt, mask = small_batch(B=2, T=2)
    txt[1, 4], txt[1, 5:], mask[1, 5:] = 102, 0, 0
    for cls in (model.VIOLET_Retrieval, model.VIOLET_QAOE):
        torch.manual_seed(0)
        m = cls(SMALL).eval()
        keys = list(m.state_dict())
        with torch.no_grad():
            ref = m(img, txt, mask)
            m.compile_blocks()
            out = m(img, txt, mask)
        assert list(m.state_dict()) == keys
        ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        assert torch.allclose(out, ref, atol=1e-4), (cls.__name__, (out - ref).abs().max())


def test_compile_blocks_graphs_do_not_grow_with_depth():
    """compile: true compiles each kind of VT block once (per stage, shifted or not), not once per block: the
    per-block drop-path rate stays out of the graphs (as a constant it made all 24 Swin-S blocks distinct graphs,
    and compiling took 3x as long). A deeper stage 3, in training with drop path, adds no graph."""
    from torch._dynamo.utils import counters
    img = small_batch(B=1, T=2)[0]
    graphs = []
    for depths in ([2, 2, 2, 2], [2, 2, 4, 2]):
        torch._dynamo.reset()
        counters.clear()
        m = model.VIOLET_QAOE({**SMALL, 'vt_depths': depths, 'vt_drop_path': 0.2}).train()
        m.compile_blocks()
        m.enc_img(img)
        graphs.append(counters['stats']['unique_graphs'])
    assert graphs[0] == graphs[1] > 0, graphs


def test_compile_blocks_keeps_pretraining_shapes_compiled(monkeypatch):
    """Pretraining meets a block's graphs for each (batch, frames, grad mode): full and last batches, attended
    masking's no-grad pass, videos and images. 12 such here (6 graphs each) passed the recompile limit of 64 that
    compile_blocks set, and dynamo ran the rest uncompiled. (Traced with the eager backend: the count, not the code.)"""
    import functools
    monkeypatch.setattr(model.torch, 'compile', functools.partial(torch.compile, backend='eager'))
    torch._dynamo.reset()
    m = model.VIOLET_Pretrain(SMALL).train()
    m.compile_blocks()
    entries = lambda: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(model.SwinTransformerBlock3D.attend.__code__))
    shapes = [(B, T, grad) for B in (4, 3, 2) for T in (4, 1) for grad in (True, False)]
    for i, (B, T, grad) in enumerate(shapes):
        with torch.set_grad_enabled(grad):
            m.enc_img(small_batch(B=B, T=T)[0])
        per_shape = per_shape if i else entries()
    assert entries() == per_shape * len(shapes) > 64, (entries(), per_shape)
    torch._dynamo.reset()


def test_compile_blocks_one_graph_for_every_text_length():
    """Pair scoring drops the text columns that are padding in every pair, so the CT's length varies with the
    batch's longest caption: compiled, it must not compile a graph per length (25 lengths, each a few seconds for
    bert-base, and past torch's recompile limit it silently runs uncompiled)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = model.VIOLET_Retrieval({**SMALL, 'size_txt': 25}).eval()
    m.compile_blocks()
    img, txt, _ = small_batch(B=2, T=2, X=25)
    graphs = []
    with torch.no_grad():
        feat_img, mask_img = m.enc_img(img)
        for lengths in ([5, 9], [13, 17, 21, 25]):
            for n in lengths:
                mask = (torch.arange(25) < n).long().expand(2, -1)
                ref = m.fc(m.go_cross(feat_img, mask_img, m.enc_txt(txt), mask)[0][:, feat_img.shape[1]]).squeeze(-1)
                assert torch.allclose(m.score(feat_img, mask_img, m.enc_txt(txt), mask), ref, atol=1e-5), n
            graphs.append(counters['stats']['unique_graphs'])
    assert graphs[0] == graphs[1], graphs


@pytest.mark.parametrize('window,n', [((2, 3, 3), 18), ((2, 3, 3), 9)])
def test_window_attention_matches_explicit(window, n):
    """Swin's window attention (SDPA on windows x heads, the bias gathered with index_select) against the
    original's formula softmax(q k^T / sqrt(d) + bias[index] + mask) v (bench.original_window_attention): outputs
    and every gradient, the bias table's included (the original gathers with table[index]), also for a window
    shrunk to its first n tokens."""
    torch.manual_seed(0)
    B, nW, heads, C = 2, 3, 2, 8
    attn = model.WindowAttention3D(C, window, heads)
    x = torch.randn(B * nW, n, C)
    mask = torch.where(torch.rand(nW, n, n) < 0.3, -100.0, 0.0)

    grads = []
    for fn in (lambda: attn(x, B, mask), lambda: bench.original_window_attention(attn, x, B, mask)):
        attn.zero_grad()
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in attn.named_parameters()}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for k in grads[0][1]:
        assert torch.allclose(grads[0][1][k], grads[1][1][k], atol=1e-6), k


@pytest.mark.parametrize('world, rank, speaks', [('2', '1', False), ('2', '0', True), ('4', '', True), (None, '1', True),
                                                 ('1', '1', True), (None, None, True)])
def test_say_on_the_first_process_alone(monkeypatch, capsys, world, rank, speaks):
    """Before a process group exists, torchrun's RANK decides; a process that is alone (no WORLD_SIZE, or 1) speaks
    whatever RANK a cluster left set (a worker pod running predict.py was silent)."""
    for key, value in (('WORLD_SIZE', world), ('RANK', rank)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    model.say('hello')
    assert capsys.readouterr().out == ('hello\n' if speaks else '')
