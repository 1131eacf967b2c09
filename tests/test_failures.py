"""Nothing silently wrong, nothing lost: skip caps, output folders, resume guards, config lists, data checked
before the first step, atomic writes. Runs are in-process on a 16-video toy set (a few seconds each)."""
import base64
import errno
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, '_tools'))
import agent  # noqa: E402
import api  # noqa: E402
import dataset  # noqa: E402
import main_pretrain  # noqa: E402
import main_qamc  # noqa: E402
import main_qaoe  # noqa: E402
from extract_tsv import write_tsv  # noqa: E402
from file_limits import file_size_limit, refused_write  # noqa: E402
from make_toy import make_toy  # noqa: E402

CONFIG = f'{REPO}/_data/toy/args_toy-qamc.json'


@pytest.fixture(scope='module')
def toy_src(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('toy'))
    make_toy(out, seed=0, n_videos=4, n_val=4, n_images=4, n_down=16, n_down_eval=8, workers=2)
    return out


@pytest.fixture
def toy(toy_src, tmp_path):
    shutil.copytree(toy_src, tmp_path / 'data')
    return str(tmp_path / 'data')


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qamc(toy, out, *sets, flags=()):
    """main_qamc.py in this process; -> the output folder."""
    return agent.main(main_qamc.QAMC, CONFIG, [CONFIG, *flags, '--set', f'txt_backbone={REPO}/_data/bert-tiny',
                                               f'path_data={toy}', f'path_output={out}', 'size_epoch=1',
                                               'size_batch=4', *sets])


def stops(fn, *a, **k):
    with pytest.raises(SystemExit) as e:
        fn(*a, **k)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- skipped samples

def test_skip_cap_and_no_data(toy, tmp_path):
    """A TSV cut mid-file skipped 11 of 16 samples and still reported 'done' with ls_tr 0.0: now more than
    max_skip_frac skipped stops the run, and a unit without any trained sample is always an error."""
    frames = dataset.load_pickle(f'{toy}/img_toy.pkl')
    os.remove(f'{toy}/img_toy.pkl')
    write_tsv(frames, f'{toy}/img_toy.tsv', f'{toy}/img_toy.lineidx')
    train = [it['video'] for it in json.load(open(f'{toy}/txt_toy-qamc.json'))['train']]
    bad = set(train[:2])  # cut these two lines short (2 frames)
    lines = open(f'{toy}/img_toy.tsv').read().split('\n')[:-1]
    lines = ['\t'.join(ln.split('\t')[:3]) if ln.split('\t')[0] in bad else ln for ln in lines]
    write_tsv({ln.split('\t')[0]: ln.split('\t')[1:] for ln in lines}, f'{toy}/img_toy.tsv', f'{toy}/img_toy.lineidx')
    msg = stops(qamc, toy, tmp_path / 'a', 'skip_bad=true')
    # stopped inside the unit, where the cap is passed: resume.pt is saved there (the unit's steps were lost)
    assert re.fullmatch(r'stopping: at least [12] of the 16 samples of epoch 1 were bad and skipped, more than '
                        r'max_skip_frac 0.01 allows; run with skip_bad false to see the first error \(or raise '
                        rf'max_skip_frac\); resume.pt saved at step \d: --resume {tmp_path / "a"} goes on from there',
                        msg), msg
    qamc(toy, tmp_path / 'b', 'skip_bad=true', 'max_skip_frac=0.2')  # allowed: 2 of 16, counted
    log = agent.read_run_log(tmp_path / 'b')
    assert log['n_skipped'] == sum(it['video'] in bad for s in ('train', 'val', 'test')
                                   for it in json.load(open(f'{toy}/txt_toy-qamc.json'))[s])
    assert 0 < log['ls_tr'][0]
    # ... and goes on from there as the run that allowed them from the start (also inside a grad_accum window, whose
    # start is saved)
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'a'), '--set', 'max_skip_frac=0.2'])
    assert agent.read_run_log(tmp_path / 'a') == log
    stops(qamc, toy, tmp_path / 'a2', 'skip_bad=true', 'grad_accum=2', 'size_batch=2')
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'a2'), '--set', 'max_skip_frac=0.2'])
    qamc(toy, tmp_path / 'b2', 'skip_bad=true', 'grad_accum=2', 'size_batch=2', 'max_skip_frac=0.2')
    assert agent.read_run_log(tmp_path / 'a2') == agent.read_run_log(tmp_path / 'b2')
    # the file cut after its first third: its index points past its end, refused before the first step
    raw = open(f'{toy}/img_toy.tsv', 'rb').read()
    open(f'{toy}/img_toy.tsv', 'wb').write(raw[:len(raw) // 3])
    msg = stops(qamc, toy, tmp_path / 'c', 'skip_bad=true', 'max_skip_frac=1.0')
    assert re.fullmatch(rf'{toy}/img_toy.lineidx: entry \d+ \(byte \d+\) is past the last of the \d+ lines of '
                        rf'{toy}/img_toy.tsv \(a line dropped from the index, or an index of another version of the '
                        r'file\?\)', msg), msg
    # every training video bad (2 frames): even max_skip_frac 1 does not make that a run
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    train = {it['video'] for it in qs['train']}
    qs['train'] = [it for it in qs['train'] if it['video'] not in {it['video'] for s in ('val', 'test') for it in qs[s]}]
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    write_tsv({v: f[:2] if v in train else f for v, f in frames.items()}, f'{toy}/img_toy.tsv', f'{toy}/img_toy.lineidx')
    msg = stops(qamc, toy, tmp_path / 'c', 'skip_bad=true', 'max_skip_frac=1.0', 'size_frame=5')
    assert qs["train"]
    assert not os.path.exists(tmp_path / 'c' / 'log.json') or agent.read_run_log(tmp_path / 'c')['ls_tr'] == []


# ---------------------------------------------------------------------------------------------- output folders

def test_output_folder_is_one_runs(toy, tmp_path, capsys):
    out = tmp_path / 'run'
    qamc(toy, out, 'stop_after_steps=1', 'save_every=1')
    first = sorted(os.listdir(out))
    assert {'args.json', 'resume.pt', 'ckpt_violet_toy-qamc_0.pt', '.lock'} <= set(first)
    # a second run into the same folder is refused, nothing of the first touched
    mtimes = {f: os.path.getmtime(out / f) for f in first if f != '.lock'}
    assert stops(qamc, toy, out) == (f"{out} holds another run's files (args.json, ckpt_violet_toy-qamc_0.pt, log.json, "
                                     f"log_extra.json, ...): continue that run with --resume {out}, choose another path_output, "
                                     f"or pass --overwrite to replace them")
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out) if f != '.lock'} == mtimes
    # a running run holds the folder's lock: a concurrent resume (or run) is refused
    with open(out / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('pid 4242 on elsewhere\n')
        held.flush()
        msg = stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out)])
        assert msg.startswith(f'{out} is in use by another run (') and msg.endswith(
            '); wait for it to end or choose another path_output')
    # resume inside the epoch with another size_batch or grad_accum: refused (the position is a batch count)
    # (the seed orders the batches: with another one the count points at other samples)
    for change in ('size_batch=8', 'grad_accum=2', 'seed=5'):
        msg = stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', change])
        k = change.split('=')[0]
        assert msg == (f"resume: the run stopped inside a unit (step 1); {k} {dict(size_batch=4, grad_accum=1, seed=0)[k]} "
                       f"-> {change.split('=')[1]} would skip or repeat samples: resume with the run's values, or from a "
                       f"unit boundary")
    # a key that shapes the model: the weights would not load (hundreds of lines of torch's size mismatches)
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'vt_dim=32']) == (
        "resume: vt_dim 16 -> 32 would build another model than the run's weights: resume with the run's values (a new "
        "model is a new run: --set path_ckpt=CKPT)")
    # a checkpoint of weights is not a resume state (KeyError: 'args'); a run killed before its first resume.pt
    ckpt = out / 'ckpt_violet_toy-qamc_0.pt'
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(ckpt)]) == (
        f'resume: {ckpt} holds weights alone, not a resume state (resume.pt): to train from them, start a run with '
        f'--set path_ckpt={ckpt}')
    os.makedirs(tmp_path / 'early')
    shutil.copy(out / 'args.json', tmp_path / 'early')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'early')]) == (
        f"resume: no resume state at {tmp_path / 'early' / 'resume.pt'} (the run stopped before its first one: "
        f"save_minutes / save_every, or the end of its first unit): start it again with its command line and --overwrite")
    # ... or with another process count (a 2-process state here)
    state = torch.load(out / 'resume.pt', weights_only=True)
    torch.save({**state, 'world': 2, 'ranks': state['ranks'] * 2}, tmp_path / 'resume.pt')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'resume.pt')]) == (
        'resume: the run stopped inside a unit with 2 processes; resume it with the same number (this has 1), or from '
        'a unit boundary')
    # a truncated resume state is named as such
    raw = (out / 'resume.pt').read_bytes()
    (tmp_path / 'resume.pt').write_bytes(raw[:len(raw) // 2])
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'resume.pt')]).startswith(
        f"resume: {tmp_path / 'resume.pt'}: truncated or corrupt PyTorch checkpoint (was its writing interrupted?): ")
    # a config file given with --resume is not applied (the run keeps its args.json): one that says otherwise than
    # the run's args (and this invocation's --set) is refused (its lr 5 was ignored without a word)
    (tmp_path / 'lr5.json').write_text('{"lr": 5, "size_batch": 4}')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, [str(tmp_path / 'lr5.json'), '--resume', str(out)]) == (
        f"resume: {tmp_path / 'lr5.json'} differs from the run's args in lr: a resumed run keeps its args.json; change "
        f"a key with --set KEY=VALUE, without the config file")
    # a kill during a write left a tmp file: the resumed run removes it (and finishes); the step the killed run
    # logged after its last resume.pt is done and logged again, once. Resumed with the first command line (its
    # config file and --set) and --resume
    (out / 'resume.pt.tmp999999').write_bytes(b'half a file')
    with open(out / 'steps.jsonl', 'a') as f:
        f.write(json.dumps(dict(step=2, unit='epoch 1', unit_step=2, loss=99.0)) + '\n{"step": 3, "un')
    agent.main(main_qamc.QAMC, CONFIG, [CONFIG, '--resume', str(out), '--set', f'txt_backbone={REPO}/_data/bert-tiny',
                                        f'path_data={toy}', f'path_output={out}', 'size_epoch=1', 'size_batch=4'])
    assert not (out / 'resume.pt.tmp999999').exists()
    lines = [json.loads(x) for x in open(out / 'steps.jsonl')]
    assert [(x['step'], 'eval' in x) for x in lines] == [(1, False), (2, False), (3, False), (4, False), (4, True)]
    assert all(x.get('loss') != 99.0 for x in lines)
    assert 'ckpt_violet_toy-qamc_1.pt' in os.listdir(out)
    # resuming the finished run trains nothing and says so (it used to print 'done')
    capsys.readouterr()
    before = (out / 'args.json').read_text()
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'lr=0.9', 'seed=5'])
    said = capsys.readouterr().out
    assert (out / 'args.json').read_text() == before  # (it recorded the lr and seed of no training)
    assert 'resume: lr' not in said  # (nor announced the lr it would not train with)
    assert said.strip().endswith(f'nothing to do: {out} has finished all 1 units (the last: epoch 1); --set '
                                 f'size_epoch=N with a larger N trains on') and 'done' not in said, said
    # --overwrite: the old run's files go, the new run's come
    (out / 'ckpt_violet_toy-qamc_7.pt').write_bytes(b'an old epoch')
    os.makedirs(out / 'tb')
    (out / 'tb' / 'events.out.tfevents.old').write_bytes(b'old events')
    qamc(toy, out, 'stop_after_steps=1', flags=['--overwrite'])
    assert 'ckpt_violet_toy-qamc_7.pt' not in os.listdir(out) and 'ckpt_violet_toy-qamc_1.pt' not in os.listdir(out)
    assert not (out / 'tb').exists() and [json.loads(x)['step'] for x in open(out / 'steps.jsonl')] == [1]
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 1


def test_output_folder_that_cannot_be_written(toy, tmp_path):
    (tmp_path / 'a_file').write_text('')
    assert stops(qamc, toy, tmp_path / 'a_file' / 'run') == f"path_output: cannot write in {tmp_path / 'a_file' / 'run'}: Not a directory"


def test_stop_after_the_last_step_is_done(toy, tmp_path, capsys):
    """stop_after_steps reached at the run's very end: the run is done, not 'stopped' (it said both)."""
    out = qamc(toy, tmp_path / 'run', 'stop_after_steps=4')  # 16 items, batch 4: the epoch's 4 steps
    said = capsys.readouterr().out
    assert said.strip().endswith(f'done: {out}') and 'stopped after' not in said, said


def test_damaged_resume_state_is_named(toy, tmp_path):
    """A resume.pt lacking what the trainer reads (an edited or cut-down copy, another version's): each was a KeyError,
    TypeError or load_state_dict traceback."""
    out = qamc(toy, tmp_path / 'run', 'stop_after_steps=2')
    state = torch.load(os.path.join(out, 'resume.pt'), weights_only=True)
    key = 'trsfr.layer.0.attention.self.query.weight'
    for name, edit, said in [('scaler', lambda s: s.pop('scaler'), "its optimiser or grad scaler state is missing"),
                             ('optim', lambda s: s.update(optim={}), "its optimiser or grad scaler state is missing"),
                             ('args', lambda s: s.update(args=[1]), '"args" is a list, not a dict'),
                             ('log', lambda s: s.update(log={}), "its log or its ranks' states are incomplete")]:
        damaged = {**state, 'model': dict(state['model'])}
        edit(damaged)
        (tmp_path / name).mkdir()
        torch.save(damaged, tmp_path / name / 'resume.pt')
        assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / name)]) == (
            f'resume: {tmp_path / name}/resume.pt: {said}: not a whole resume.pt of this version; resume from another '
            f'copy, or start the run again')
    damaged = {**state, 'model': {k: v for k, v in state['model'].items() if k != key}}
    (tmp_path / 'model').mkdir()
    torch.save(damaged, tmp_path / 'model' / 'resume.pt')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'model')]) == (
        f"resume: resume.pt's weights do not fit the model at 1 key(s), e.g. {key}: missing: a damaged file?")
    # a key the model lacks (load_state_dict's traceback), a NaN weight (said to be 'in another shape or type')
    nan = state['model'][key].clone()
    nan[0, 0] = math.nan
    damaged = {**state, 'model': {**state['model'], 'fc.extra.weight': nan, key: nan}}
    (tmp_path / 'extra').mkdir()
    torch.save(damaged, tmp_path / 'extra' / 'resume.pt')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(tmp_path / 'extra')]) == (
        f"resume: resume.pt's weights do not fit the model at 2 key(s), e.g. {key}: NaN or infinite values in the file; "
        f"fc.extra.weight: not a key of the model: a damaged file?")


def test_backbone_folder_without_vocabulary_is_one_line(toy, tmp_path):
    """txt_backbone naming a folder with a BERT config alone: the model builds (random weights), the tokenizer
    cannot; README promised one line, the scripts gave a 25-line traceback. No output folder is left behind."""
    import transformers
    transformers.BertConfig.from_pretrained(f'{REPO}/_data/bert-tiny').save_pretrained(tmp_path / 'cfg')
    assert stops(qamc, toy, tmp_path / 'run', f'txt_backbone={tmp_path}/cfg') == (
        f"{tmp_path}/cfg has no tokenizer vocabulary (vocab.txt or tokenizer.json): put the model's vocab.txt there, "
        f"or name it with the config key txt_vocab (a vocab.txt or tokenizer dir)")
    assert not os.path.exists(tmp_path / 'run')


def test_out_of_memory_is_one_line_with_what_to_change(toy, tmp_path, monkeypatch):
    """A training step that runs out of GPU memory (here raised by hand: this machine has no GPU) stops the run with
    torch's first line, the settings that decide the memory and what to change, not a traceback."""
    step, calls = main_qamc.QAMC.step, [0]
    def step_out_of_memory(self, *a):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of '
                                         '79.19 GiB of which 1.20 GiB is free.\nOf the allocated memory 75 GiB ...')
        return step(self, *a)
    monkeypatch.setattr(main_qamc.QAMC, 'step', step_out_of_memory)
    assert stops(qamc, toy, tmp_path / 'run') == (
        'epoch 1 step 1: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of '
        'which 1.20 GiB is free. (size_batch 4 per process, precision fp32, grad_ckpt false): set grad_ckpt: true (the '
        'same batches in less memory), or lower size_batch (raising grad_accum keeps the samples per optimiser step; '
        'from a unit boundary, as size_batch cannot change inside one)')


def test_default_output_names_differ_within_a_second():
    names = {agent.default_output('toy-qamc') for _ in range(50)}
    assert len(names) == 50 and all(re.fullmatch(r'_snapshot/_toy-qamc_\d{14}_[0-9a-f]{6}', n) for n in names)


def test_refused_write_keeps_the_old_file_and_names_the_new(tmp_path):
    """Each kind of file the project writes, when the OS refuses the write part way: the file there before is
    intact, no temporary file is left behind (it would keep a full disk full), and the error names the file and the
    OS's reason (torch.save's own message would be '[enforce fail at inline_container.cc:672] . unexpected pos')."""
    big = torch.arange(200_000, dtype=torch.float32)
    writers = {'a.pt': lambda obj, p: dataset.write_torch(obj, p),
               'a.json': lambda obj, p: dataset.write_json(obj if isinstance(obj, list) else obj.tolist(), p),
               'a.pkl': lambda obj, p: dataset.write_pickle(obj, p),
               'a.safetensors': lambda obj, p: agent.save_safetensors({'w': torch.as_tensor(obj)}, p),
               'a.tsv': lambda obj, p: write_tsv({'v': [str(x) for x in torch.as_tensor(obj).tolist()]}, str(p),
                                                 str(p.with_suffix('.lineidx')))}
    for name, write in writers.items():
        path = tmp_path / name
        write(big[:10], path)
        old = path.read_bytes()
        with file_size_limit(100_000):
            with pytest.raises(dataset.WriteError) as e:
                write(big, path)
        assert re.fullmatch(refused_write(path), str(e.value)), str(e.value)
        assert path.read_bytes() == old, name
        assert not [f for f in os.listdir(tmp_path) if '.tmp' in f], (name, os.listdir(tmp_path))
    # a failure that is not the OS refusing the write is raised as it is (its temporary file removed all the same)
    def broken(tmp):
        open(tmp, 'w').write('half')
        raise RuntimeError('a bug in the writer')
    with pytest.raises(RuntimeError, match='^a bug in the writer$'):
        dataset.write_atomic(tmp_path / 'b.json', broken)
    assert sorted(os.listdir(tmp_path)) == sorted(list(writers) + ['a.lineidx'])


def test_output_folder_on_a_full_disk_or_without_locks(tmp_path, monkeypatch, capsys):
    """Taking the output folder: a full disk when its .lock is written was a traceback (the documented one line
    elsewhere), and left a folder holding the .lock alone; a file system without flock (Lustre mounted noflock,
    NFS without lockd) stopped every run with 'OSError: [Errno 38] Function not implemented'."""
    out = tmp_path / 'run'
    with file_size_limit(0):
        assert stops(agent.lock_folder, str(out)) == f'path_output: cannot write in {out}: File too large'
    assert not out.exists()
    (tmp_path / 'kept').mkdir()
    with file_size_limit(0):  # a folder that was there stays
        assert stops(agent.lock_folder, str(tmp_path / 'kept'), '--out').startswith('--out: cannot write in ')
    assert (tmp_path / 'kept').is_dir()

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    lock = agent.lock_folder(str(out))
    assert capsys.readouterr().out == (f'path_output: {out} cannot be locked (No locks available): nothing stops '
                                       f'another run from writing in it too\n')
    assert (out / '.lock').read_text().startswith(f'pid {os.getpid()} on ')
    lock.close()


def test_full_disk_stops_the_run_and_resume_goes_on(toy, tmp_path):
    """A long run whose disk fills up: the checkpoint that does not fit stops the run with one line naming it; every
    file written before is whole, nothing half-written is left, and once there is room --resume goes on from the
    last resume.pt to the weights and log of an unbroken run."""
    whole = qamc(toy, tmp_path / 'whole', 'size_epoch=50', 'stop_after_steps=8')  # 16 items, batch 4: 2 epochs
    out = tmp_path / 'run'
    qamc(toy, out, 'size_epoch=50', 'stop_after_steps=2')  # resume.pt at step 2 of epoch 1
    resume = (out / 'resume.pt').read_bytes()
    ckpt = os.path.getsize(out / 'ckpt_violet_toy-qamc_0.pt')
    with file_size_limit((ckpt + len(resume)) // 2):  # an epoch's weights fit, a resume state (optimiser too) not
        msg = stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'stop_after_steps=6'])
    assert re.fullmatch(refused_write(out / 'resume.pt') + re.escape(
        f'; the files written before are whole: make room and continue with --resume {out} (from its last '
        f'resume.pt)'), msg), msg
    assert (out / 'resume.pt').read_bytes() == resume  # (the save at the end of epoch 1's training failed)
    assert not [f for f in os.listdir(out) if '.tmp' in f] and len(open(out / 'steps.jsonl').readlines()) == 4
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'stop_after_steps=6'])
    for ep in (1, 2):
        a, b = (torch.load(os.path.join(d, f'ckpt_violet_toy-qamc_{ep}.pt'), weights_only=True) for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ep
    assert agent.read_run_log(out) == agent.read_run_log(whole)
    # a new run whose first checkpoint does not fit: there is no resume.pt to go on from, and the line says so
    with file_size_limit(ckpt // 2):
        msg = stops(qamc, toy, tmp_path / 'new')
    assert re.fullmatch(refused_write(tmp_path / 'new' / 'ckpt_violet_toy-qamc_0.pt') + re.escape(
        '; the files written before are whole: make room and start it again (--overwrite replaces the files of this '
        'run)'), msg), msg


def test_a_unit_of_only_non_finite_steps_names_the_loss(toy, tmp_path, monkeypatch):
    """Every step of a unit non-finite (a diverged run: lr far too high), fewer than max_nonfinite in a row: the stop
    said '0 of 16 skipped as bad ... see the first error with skip_bad false', of a run without a bad sample."""
    step = main_qamc.QAMC.step

    def diverged(task, model, batch, gen):
        loss, losses, hits = step(task, model, batch, gen)
        return loss * math.nan, {k: v * math.nan for k, v in losses.items()}, hits
    monkeypatch.setattr(main_qamc.QAMC, 'step', diverged)
    assert stops(qamc, toy, tmp_path / 'run') == ('stopping: epoch 1 trained on no sample: the loss of every step was '
                                                  'non-finite; try a lower lr, max_grad_norm or precision bf16/fp32')


def test_fp16_steps_the_scaler_skipped_are_counted(toy, tmp_path, monkeypatch):
    """fp16's GradScaler skips a step with inf/NaN gradients (and halves its scale) without a word: a run of which
    it skipped every step said 'done' with the weights it started from. Now counted (n_overflow), and such a run stops."""
    out = qamc(toy, tmp_path / 'ok', 'precision=fp16', 'stop_after_steps=3')  # (CPU autocast takes fp16 too)
    log = agent.read_run_log(out)
    assert log['n_overflow'] == 0
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda *a, **k: scaler(*a, **k, init_scale=2.0 ** 127))
    assert stops(qamc, toy, tmp_path / 'run', 'precision=fp16') == (
        "stopping: fp16's GradScaler skipped every one of the 4 optimiser steps (inf/NaN gradients): the weights are "
        "those the run started from; try precision bf16/fp32, a lower lr or max_grad_norm")
    assert agent.read_run_log(tmp_path / 'run')['n_overflow'] == 4


def test_resume_refuses_a_position_that_moved(toy, tmp_path):
    """resume.pt's position is a unit index and a batch count. A training part removed (or datasets reordered) made the
    resumed pretraining skip a part and say 'done'; a train split edited inside an epoch resumed at its batch 2 of
    another order. Both are refused now, naming the unit; units after the position may change (size_epoch)."""
    pre = f'{REPO}/_data/toy/args_pretrain.json'
    out = tmp_path / 'pre'
    argv = [pre, '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}', 'size_epoch=1',
            'size_batch=4']
    agent.main(main_pretrain.Pretrain, pre, argv + ['stop_after_steps=2'])  # toyvid's two parts (2 videos each)
    assert torch.load(out / 'resume.pt', weights_only=True)['unit'] == 2
    os.makedirs(tmp_path / 'aside')
    for ext in ('tsv', 'lineidx'):
        shutil.move(f'{toy}/img_toyvid_train_1.{ext}', tmp_path / 'aside')
    said = ("resume: the run's units are not those of its resume.pt: unit 2 was 'ep 1 toyvid part 1', is now 'ep 1 "
            "toyimg part 0' (a training part added or removed, or datasets reordered?): resume with the run's data "
            "files and datasets")
    assert stops(agent.main, main_pretrain.Pretrain, pre, ['--resume', str(out)]) == said
    for ext in ('tsv', 'lineidx'):
        shutil.move(tmp_path / 'aside' / f'img_toyvid_train_1.{ext}', toy)
    assert stops(agent.main, main_pretrain.Pretrain, pre, ['--resume', str(out), '--set',
                                                           'datasets=["toyimg","toyvid"]']).startswith(
        "resume: the run's units are not those of its resume.pt: unit 1 was 'ep 1 toyvid part 0', is now 'ep 1 toyimg")
    agent.main(main_pretrain.Pretrain, pre, ['--resume', str(out), '--set', 'size_epoch=2', 'stop_after_steps=1'])
    # fine-tuning stopped inside epoch 1 (16 samples), then the train split edited
    out = tmp_path / 'qamc'
    qamc(toy, out, 'stop_after_steps=2', 'save_every=1')
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    qs['train'] = qs['train'][:9]
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out)]) == (
        'resume: epoch 1 had 16 training samples when resume.pt was saved inside it (step 2), it has 9 now: going on '
        'there would skip or repeat samples; restore its data to resume')


def test_resume_with_another_lr_uses_it(toy, tmp_path, capsys):
    """`--resume --set lr=... decay=...` was recorded in args.json, but the optimiser's saved param groups brought
    the old values back: training went on with them, and the logs named an lr never used."""
    out = tmp_path / 'qamc'
    qamc(toy, out, 'stop_after_steps=2', 'lr=1e-4')
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'lr=5e-4', 'decay=0.2'])
    assert 'resume: lr 0.0001 -> 0.0005, decay 0.001 -> 0.2 from here on' in capsys.readouterr().out
    lrs = [(r['step'], r['lr']) for r in map(json.loads, open(out / 'steps.jsonl')) if 'lr' in r]
    assert lrs == [(1, 1e-4), (2, 1e-4), (3, 5e-4), (4, 5e-4)]
    groups = torch.load(out / 'resume.pt', weights_only=True)['optim']['param_groups']
    assert {(g['lr'], g['weight_decay']) for g in groups} == {(5e-4, 0.2)}


def test_resume_from_an_evaluation_with_another_process_count(toy, tmp_path, monkeypatch):
    """A run stopped in a unit's evaluation (its training done, resume.pt at the unit's last batch) was refused at
    another process count as 'stopped inside a unit'. It resumes now: the ranks' sums of the unit go to rank 0, and
    the log is the unbroken run's. (A 2-process resume.pt stood in for: its sums split over two ranks.)"""
    ref = agent.read_run_log(qamc(toy, tmp_path / 'ref'))
    evaluate = agent.Trainer.evaluate
    monkeypatch.setattr(agent.Trainer, 'evaluate', lambda *a: (_ for _ in ()).throw(SystemExit('stopped')))
    out = tmp_path / 'run'
    assert stops(qamc, toy, out) == 'stopped'
    monkeypatch.setattr(agent.Trainer, 'evaluate', evaluate)
    state = torch.load(out / 'resume.pt', weights_only=False)
    assert (state['step'], state['unit_size'], state['world']) == (4, 16, 1)
    one = state['ranks'][0]  # its sums split over two ranks (one loss and one sample the second's)
    state['ranks'] = [dict(one, sums={k: v - 1.0 for k, v in one['sums'].items()},
                           counts={k: n - 1 for k, n in one['counts'].items()}, n_samples=one['n_samples'] - 4),
                      dict(one, sums={k: 1.0 for k in one['sums']}, counts={k: 1 for k in one['counts']}, n_samples=4)]
    state['world'] = 2  # 8 samples a rank, 2 batches: step 4 is past them
    torch.save(state, out / 'resume.pt')
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out)])
    log = agent.read_run_log(out)
    assert log['ls_tr'] == pytest.approx(ref['ls_tr'], rel=1e-12) and log['ls_tr'] != [
        (one['sums']['tr'] - 1) / (one['counts']['tr'] - 1)]  # (rank 0's share alone would differ)
    assert log['ac_vl'] == ref['ac_vl'] and log['ac_ts'] == ref['ac_ts']
    state['step'] = 1  # inside the unit: still refused
    torch.save(state, out / 'resume.pt')
    assert stops(agent.main, main_qamc.QAMC, CONFIG, ['--resume', str(out)]).startswith(
        'resume: the run stopped inside a unit with 2 processes; resume it with the same number (this has 1)')


def test_learning_rate_zero_is_refused(toy, tmp_path):
    """lr 0 trained to 'done' with the weights it started from (the checkpoints of epoch 0 and the last equal)."""
    assert stops(qamc, toy, tmp_path / 'run', 'lr=0') == (
        "config error: key 'lr' is 0: training would not change the weights (to evaluate a checkpoint as it is: "
        "--eval --set path_ckpt=FILE)")
    assert not os.path.exists(tmp_path / 'run')


def test_output_folder_removed_mid_run(toy, tmp_path, monkeypatch):
    """The run's folder deleted while it trains: one line saying so (the cleanup's os.listdir of the missing folder
    put 'No such file or directory' in its place, and the full-disk advice said to make room)."""
    out, save_unit = tmp_path / 'run', agent.Trainer.save_unit

    def removed_first(trainer, name):
        if name != 'ckpt_violet_toy-qamc_0.pt':
            shutil.rmtree(out)
        return save_unit(trainer, name)
    monkeypatch.setattr(agent.Trainer, 'save_unit', removed_first)
    msg = stops(qamc, toy, out, 'size_epoch=1')
    assert re.fullmatch(rf"could not write {out}/ckpt_violet_toy-qamc_1.pt: No such file or directory \(.*\): the run's "
                        rf"folder {out} is gone \(removed while the run wrote to it\?\), and with it its checkpoints "
                        rf"and resume.pt: start it again", msg), msg


# ---------------------------------------------------------------------------------------------- config and data

def error_of(*sets):
    with pytest.raises(SystemExit) as e:
        agent.load_args(CONFIG, sets)
    return str(e.value)


def test_list_and_sign_checks():
    assert error_of('vt_depths=[2,2,2]') == "config error: key 'vt_depths' must be a list of 4 ints, got 3: [2, 2, 2] (--set)"
    assert error_of('vt_heads=[1,2,"4",8]') == "config error: key 'vt_heads' must hold ints, got str '4' in [1, 2, '4', 8] (--set)"
    assert error_of('vt_window=[8,4,0]') == "config error: key 'vt_window' must hold values >= 1, got 0 in [8, 4, 0] (--set)"
    assert error_of('vt_depths=[2,2,2.5,2]') == "config error: key 'vt_depths' must hold ints, got float 2.5 in [2, 2, 2.5, 2] (--set)"
    assert error_of('datasets=["cc3m",3]') == "config error: key 'datasets' must hold strs, got int 3 in ['cc3m', 3] (--set)"
    assert error_of('datasets=[]') == "config error: key 'datasets' must not be empty (--set)"
    assert error_of('stop_after_steps=-1') == "config error: key 'stop_after_steps' must be >= 0, got -1 (--set)"
    assert error_of('save_every=-5') == "config error: key 'save_every' must be >= 0, got -5 (--set)"
    assert error_of('max_skip_frac=-0.1') == "config error: key 'max_skip_frac' must be >= 0, got -0.1 (--set)"
    # one token would be [CLS] alone: the tokenizer then returns the text untruncated and batching failed
    assert error_of('size_txt=1') == "config error: key 'size_txt' must be >= 3, got 1 (--set)"
    assert agent.load_args(CONFIG, ['vt_window=[2,2,2]', 'datasets=["a"]'])['vt_window'] == [2, 2, 2]


def test_model_preset_in_configs(tmp_path):
    """The toy configs name the preset: they load to the keys they used to spell out; a file or --set key wins over
    the preset, and a run's saved args (every key written out) load to themselves."""
    flat = dict(txt_backbone='./_data/bert-tiny', path_vt='', vt_dim=16, vt_depths=[2, 2, 2, 2], vt_heads=[1, 2, 4, 8],
                vt_window=[8, 4, 4], vt_drop_path=0.0, head_dropout=0.0)
    args = agent.load_args(CONFIG)
    assert {k: args[k] for k in flat} == flat and args['model_preset'] == 'toy'
    assert agent.load_args(CONFIG, ['vt_dim=8'])['vt_dim'] == 8
    assert agent.load_args(base={**args, 'vt_window': [2, 2, 2]})['vt_window'] == [2, 2, 2]
    assert agent.load_args(base={**args, 'model_preset': ''}) == {**args, 'model_preset': ''}
    assert error_of('model_preset=tiny') == "config error: key 'model_preset' must be one of ['', 'toy'], got 'tiny' (--set)"


def test_data_checked_before_the_first_step(toy, tmp_path):
    """A missing split used to surface after a whole training epoch."""
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    del qs['test']
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    msg = stops(qamc, toy, tmp_path / 'run')  # one line naming the file, not a traceback
    assert msg == f'{toy}/txt_toy-qamc.json: no key "test" (has [\'train\', \'val\'])'
    assert not os.path.exists(tmp_path / 'run')  # nothing trained, nothing written
    # pretraining: each dataset's val split and texts, each part's frames, without a step
    args = agent.load_args(f'{REPO}/_data/toy/args_pretrain.json', [f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}'])
    main_pretrain.Pretrain(args).check_data()
    vq = dataset.load_pickle(f'{toy}/vq_toyimg.pkl')
    gone = dataset.TSV(f'{toy}/img_toyimg_train_1.tsv').first_field(dataset.read_lineidx(f'{toy}/img_toyimg_train_1.lineidx')[0])
    with open(f'{toy}/vq_toyimg.pkl', 'wb') as f:  # a video of the last part: found after the other parts trained
        pickle.dump({k: v for k, v in vq.items() if k != gone}, f)
    with pytest.raises(ValueError, match=rf'vq_toyimg.pkl: no VQ tokens for video "{gone}" \({toy}/img_toyimg_train_1.tsv line \d+'):
        main_pretrain.Pretrain(args).check_data()
    main_pretrain.Pretrain(dict(args, skip_bad=True)).check_data()  # skipped and counted as they come
    with open(f'{toy}/vq_toyimg.pkl', 'wb') as f:
        pickle.dump(vq, f)
    txt = json.load(open(f'{toy}/txt_toyimg.json'))  # an empty caption: a line of the spread sample
    json.dump({**txt, 'train': {**txt['train'], gone: ' '}}, open(f'{toy}/txt_toyimg.json', 'w'))
    with pytest.raises(ValueError, match=rf'txt_toyimg.json\["train"\]\["{gone}"\]: the caption is empty \(only \[CLS\] '
                                         rf'\[SEP\] .*\) \({toy}/img_toyimg_train_1.tsv line 0 \(offset 0\)\)'):
        main_pretrain.Pretrain(args).check_data()
    json.dump(txt, open(f'{toy}/txt_toyimg.json', 'w'))
    open(f'{toy}/img_toyimg_train_1.lineidx', 'w').close()  # an empty part stopped only after the others trained
    with pytest.raises(ValueError, match=r'img_toyimg_train_1.lineidx: no video \(an empty part or index\)'):
        main_pretrain.Pretrain(args).check_data()
    os.remove(f'{toy}/img_toyimg_train_1.lineidx')
    with pytest.raises(FileNotFoundError, match='img_toyimg_train_1.lineidx'):
        main_pretrain.Pretrain(args).check_data()
    txt = json.load(open(f'{toy}/txt_toyvid.json'))
    saved = dict(txt)
    del txt['train']
    json.dump(txt, open(f'{toy}/txt_toyvid.json', 'w'))
    with pytest.raises(KeyError, match=r'txt_toyvid.json: no key "train"'):
        main_pretrain.Pretrain(args).check_data()
    json.dump(saved, open(f'{toy}/txt_toyvid.json', 'w'))
    os.rename(f'{toy}/vq_toyimg.pkl', f'{toy}/vq_gone.pkl')  # no VQ targets: where they come from, and pixel
    with pytest.raises(FileNotFoundError, match=re.escape(
            f'missing data file: {toy}/vq_toyimg.pkl (the MVM targets: _tools/extract_vq.py writes them with the DALL-E '
            f'encoder; without it, mvm_target "pixel" predicts the frames\' pixels, VIOLETv2\'s)')):
        main_pretrain.Pretrain(args).check_data()


def test_bad_sample_in_a_worker_is_one_line(toy, tmp_path):
    """A bad sample stopped the run with 60 lines of traceback through the DataLoader worker and torch's re-raise;
    the message alone is what the script prints (SystemExit), and a missing file likewise."""
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    qs['train'][0]['question'] = 5
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    said = f'{toy}/txt_toy-qamc.json["train"][0]: "question" is int 5, not a string'
    assert stops(qamc, toy, tmp_path / 'a', 'num_workers=1') == said
    assert stops(qamc, toy, tmp_path / 'b', 'num_workers=0') == said
    os.remove(f'{toy}/txt_toy-qamc.json')
    assert stops(qamc, toy, tmp_path / 'c') == f'missing data file: {toy}/txt_toy-qamc.json'


def test_unknown_video_checked_before_the_first_step(toy, tmp_path):
    """An unknown video id in the test split used to stop the run at the end of a whole epoch of training."""
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    qs['test'][2]['video'] = qs['test'][5]['video'] = 'my_clip'
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    msg = stops(qamc, toy, tmp_path / 'run')
    assert msg == (f'{toy}/txt_toy-qamc.json["test"][2]: no video "my_clip" in {toy}/img_toy.pkl (1 more of the '
                   f"split's items lack theirs)")
    assert not os.path.exists(tmp_path / 'run')  # nothing trained, nothing written
    qamc(toy, tmp_path / 'skip', 'skip_bad=true', 'max_skip_frac=0.5', 'stop_after_steps=1')  # skipped as they come
    # an empty option (here of the test split) trained and was evaluated as [CLS] [SEP] without a word
    qs['test'][2]['video'] = qs['test'][5]['video'] = qs['test'][0]['video']
    qs['test'][3]['option_1'], qs['test'][4]['option_4'] = '', ' \t'
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    msg = stops(qamc, toy, tmp_path / 'run')
    assert msg == (f'{toy}/txt_toy-qamc.json["test"][3] (video "{qs["test"][3]["video"]}"): "option_1" is empty (only '
                   f"[CLS] [SEP] would be left of it: no words to learn from or match) (1 more of the split's items "
                   f'have an empty text)')
    assert not os.path.exists(tmp_path / 'run')


def test_data_that_does_not_fit_the_task_is_named_before_the_first_step(toy, tmp_path, capsys):
    """Each of these stopped the run at its first step (or first evaluation) with a message that said to fix the
    data or set skip_bad, left a resume.pt, and named no key: another task's texts, more options than the items
    have, a size_frame the videos do not have, an empty val split. Now before anything is written."""
    out = tmp_path / 'run'
    capsys.readouterr()
    assert stops(qamc, toy, out, 'task=toy-qaoe', 'retrieval_loss=both', 'datasets=["a"]') == (
        f'{toy}/txt_toy-qaoe.json["train"][0]: no key "option_0"; its keys are video, question, answer: the texts of '
        f"another task? (15 more of the split's items lack a key)")
    # keys only other tasks read are said (they were taken without a word)
    assert capsys.readouterr().out.startswith('note: qamc does not read datasets, retrieval_loss (keys of pretrain, '
                                              'retrieval)\n')
    assert stops(qamc, toy, out, 'size_option=8') == (
        f'{toy}/txt_toy-qamc.json["train"][0]: no key "option_5"; size_option is 8 (15 more of the split\'s items lack '
        f'a key)')
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    del qs['val'][2]['question']  # one item: no guess at another task
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    assert stops(qamc, toy, out) == f'{toy}/txt_toy-qamc.json["val"][2]: no key "question"'
    assert stops(qamc, toy, out, 'size_frame=6') == (f"config error: key 'size_frame' is 6, but none of 32 sampled "
                                                     f"videos of {toy}/img_toy.pkl has that many frames (they have 5; "
                                                     f"size_frame 0 takes their count)")
    json.dump({**qs, 'val': []}, open(f'{toy}/txt_toy-qamc.json', 'w'))
    assert stops(qamc, toy, out, 'skip_bad=true') == (f'{toy}/txt_toy-qamc.json: "val" has no items (every split the '
                                                      f'run trains on or evaluates needs some)')
    assert not os.path.exists(out)
    # retrieval with one video a batch learns nothing (loss 0) and measures nothing (accuracy 1); a pretraining
    # dataset named twice ran twice an epoch, the second writing over the first's checkpoints
    import main_retrieval
    config = f'{REPO}/_data/toy/args_toy-retrieval.json'
    assert stops(agent.main, main_retrieval.Retrieval, config, [config, '--set', 'size_batch=1']) == (
        "config error: key 'size_batch' is 1, but retrieval trains and measures each video against the other texts of "
        "its batch: at least 2")
    config = f'{REPO}/_data/toy/args_pretrain.json'
    assert stops(agent.main, main_pretrain.Pretrain, config, [config, '--set', 'datasets=["toyimg","toyvid","toyimg"]']) == (
        "config error: key 'datasets' names toyimg twice: ['toyimg', 'toyvid', 'toyimg']")


def test_qaoe_size_vocab_past_the_vocabulary(toy, tmp_path, capsys):
    """The original trained a size_vocab over the json's "vocab" (its classes past it never a target), e.g. a
    1,000-class head kept for a shorter answer list; it was refused here. It trains now, and vocab.json holds null
    for the classes without a text, so predict.py reads it, and still refuses a vocabulary too short for the head."""
    txt = json.load(open(f'{toy}/txt_toy-qaoe.json'))
    txt['vocab'] = txt['vocab'][:8]
    for split in ('train', 'val', 'test'):
        txt[split] = [q for q in txt[split] if q['answer'] < 8]
    json.dump(txt, open(f'{toy}/txt_toy-qaoe.json', 'w'))
    config = f'{REPO}/_data/toy/args_toy-qaoe.json'
    oe = agent.main(main_qaoe.QAOE, config, [config, '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}',
                                             f'path_output={tmp_path / "run"}', 'size_epoch=1', 'size_batch=4',
                                             'size_vocab=12', 'stop_after_steps=2'])
    assert (f'size_vocab 12: {toy}/txt_toy-qaoe.json names 8 answers in its "vocab", so classes 8..11 are never a '
            f'target (as in the original); vocab.json lists them as null (--set size_vocab=0: as many as it names)'
            ) in capsys.readouterr().out
    assert json.load(open(f'{oe}/vocab.json')) == txt['vocab'] + [None] * 4
    m = api.load(f'{oe}/ckpt_violet_toy-qaoe_0.pt', device='cpu')
    assert m.model.fc[-1].out_features == 12 and m.vocab == txt['vocab'] + [None] * 4
    with pytest.raises(ValueError, match=r'the answer vocabulary has 8 entries, the model 12 classes \(a class without '
                                         r'an answer text: null in a JSON list\)$'):
        api.load(f'{oe}/ckpt_violet_toy-qaoe_0.pt', vocab=f'{toy}/txt_toy-qaoe.json', device='cpu')
    with pytest.raises(dataset.DataError, match=r'"vocab"\[1\] is None, not an answer text'):
        json.dump(dict(txt, vocab=['a', None]), open(tmp_path / 't.json', 'w'))  # a training json's "vocab" names every answer
        api.read_vocab(str(tmp_path / 't.json'))
    import predict
    top = [dict(answer=None, index=9, prob=0.5), dict(answer='red', index=0, prob=0.25)]
    assert predict.table('qaoe', [dict(video='v.mp4', question='what', top=top)], 5).splitlines()[1:] == [
        '     0.500  (class 9: no answer text)', '     0.250  red']


def test_qaoe_resume_with_another_vocabulary_is_refused(toy, tmp_path):
    """A resumed QA-OE run rewrote vocab.json from the annotation file as it is now: one regenerated with its
    answers in another order went on training with the classes meaning other words, and the earlier checkpoints
    beside the new vocab.json answered with the wrong ones."""
    config = f'{REPO}/_data/toy/args_toy-qaoe.json'
    out = tmp_path / 'run'
    argv = [config, '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}',
            'size_epoch=1', 'size_batch=4']
    agent.main(main_qaoe.QAOE, config, argv + ['stop_after_steps=2'])
    vocab = json.load(open(out / 'vocab.json'))
    txt = json.load(open(f'{toy}/txt_toy-qaoe.json'))
    order = [1, 0] + list(range(2, len(txt['vocab'])))  # the first two answers swapped, the items remapped
    txt['vocab'] = [txt['vocab'][i] for i in order]
    for split in ('train', 'val', 'test'):
        for q in txt[split]:
            q['answer'] = order.index(q['answer']) if q['answer'] >= 0 else -1
    json.dump(txt, open(f'{toy}/txt_toy-qaoe.json', 'w'))
    assert stops(agent.main, main_qaoe.QAOE, config, ['--resume', str(out)]) == (
        f"resume: {out}/vocab.json differs from what the run's data gives now (entry 0 was {vocab[0]!r}, is now "
        f"{vocab[1]!r}): the weights were trained with it; resume with the run's data files (path_data)")
    assert json.load(open(out / 'vocab.json')) == vocab


def test_qaoe_texts_without_vocab_train_on_indices(toy, tmp_path, capsys):
    """The original read only the answer indices and size_vocab: a txt_<task>.json without "vocab" (made for it by
    hand) was refused with 'no key "vocab"' whatever size_vocab said. It trains now, with no vocab.json."""
    txt = json.load(open(f'{toy}/txt_toy-qaoe.json'))
    del txt['vocab']
    json.dump(txt, open(f'{toy}/txt_toy-qaoe.json', 'w'))
    config = f'{REPO}/_data/toy/args_toy-qaoe.json'
    oe = agent.main(main_qaoe.QAOE, config, [config, '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}',
                                             f'path_output={tmp_path / "run"}', 'size_epoch=1', 'size_batch=4',
                                             'size_vocab=12', 'stop_after_steps=2'])
    assert 'no vocab.json is written (predict.py then needs --vocab, a JSON list of the answer' in capsys.readouterr().out
    assert 'ckpt_violet_toy-qaoe_0.pt' in os.listdir(oe) and 'vocab.json' not in os.listdir(oe)
    assert json.load(open(f'{oe}/args.json'))['size_vocab'] == 12
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qaoe.json', [f'txt_backbone={REPO}/_data/bert-tiny',
                                                                     f'path_data={toy}', 'size_vocab=0'])
    with pytest.raises(dataset.MissingKey, match=rf'^{toy}/txt_toy-qaoe.json: no key "vocab" .*: the answer texts '
                                                 r'by class index; without them, set size_vocab \(the number of answer '):
        main_qaoe.QAOE(args).check_data()


def test_qaoe_without_an_answer_to_learn(toy):
    """A train split whose answers are all -1 (not in the vocabulary) trained nothing and logged loss 0.0000 to
    'done'. A batch of such answers alone logs NaN (left out of the unit's mean), not 0."""
    args = agent.load_args(f'{REPO}/_data/toy/args_toy-qaoe.json', [f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}'])
    task = main_qaoe.QAOE(args)
    mdl = task.build_model()
    batch = dataset.collate_skip([task.split('train')[0]])[0][:3] + [torch.tensor([-1])]
    loss, logged, hits = task.step(mdl.train(), batch, torch.Generator())
    assert loss.item() == 0 and math.isnan(logged['tr'].item()) and hits['ac_iv'][1].item() == 0
    every_answer_minus_one(f'{toy}/txt_toy-qaoe.json')
    with pytest.raises(dataset.DataError, match=rf'^{toy}/txt_toy-qaoe.json\["train"\]: every answer is -1 \(not in the '
                                                r'vocabulary\): nothing to learn from'):
        main_qaoe.QAOE(args).check_data()


def every_answer_minus_one(path):
    txt = json.load(open(path))
    for q in txt['train']:
        q['answer'] = -1
    json.dump(txt, open(path, 'w'))


def test_qamc_answer_minus_one_is_no_answer(toy):
    """The original's loss ignored answer -1 (ignore_index) and its accuracy counted it wrong; such items were
    refused here as 'not in 0..4'. Now no loss in training, wrong in evaluation; a train split of them alone is refused."""
    args = agent.load_args(CONFIG, [f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}'])
    task = main_qamc.QAMC(args)
    mdl = task.build_model().eval()
    train = task.split('train')
    train.txt[1]['answer'] = -1
    items = [train[i] for i in range(3)]
    assert [it[3] for it in items] == [train.txt[0]['answer'], -1, train.txt[2]['answer']]
    img, txt, mask, ans = dataset.collate_skip(items)[0]
    out = mdl(img, txt, mask)
    loss, logged, hits = task.step(mdl, [img, txt, mask, ans], torch.Generator())
    keep = [0, 2]
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(out[keep], ans[keep]))
    assert hits['ac'][0].item() == (out[keep].argmax(1) == ans[keep]).sum().item() and hits['ac'][1] == 3
    loss, logged, hits = task.step(mdl.train(), [img[1:2], txt[1:2], mask[1:2], ans[1:2]], torch.Generator())
    assert loss.item() == 0 and math.isnan(logged['tr'].item()) and hits['ac'][0].item() == 0 and hits['ac'][1] == 1
    every_answer_minus_one(f'{toy}/txt_toy-qamc.json')
    with pytest.raises(dataset.DataError, match=rf'^{toy}/txt_toy-qamc.json\["train"\]: every answer is -1 \(none of the '
                                                r'options\): nothing to learn from; an answer is the index of the right'):
        main_qamc.QAMC(args).check_data()


def test_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: calls.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: calls.append(('replace', str(a))) or replace(a, b))
    agent.save_torch({'x': torch.ones(2)}, str(tmp_path / 'a.pt'))
    tmp = f'{tmp_path}/a.pt.tmp{os.getpid()}'
    assert calls == [('fsync', tmp), ('replace', tmp), ('fsync', str(tmp_path))]
    assert torch.equal(torch.load(tmp_path / 'a.pt', weights_only=True)['x'], torch.ones(2))


def test_config_keys_declared_once_with_type_default_help():
    """Every key is a typed field with a one-line help in one layer's config; README's table and --help are made
    from them (the table in README is exactly the generated one); the checks come from the fields."""
    import config
    fields = config.fields(*agent.CONFIGS.values())
    assert set(fields) == set(agent.schema())
    for k, f in fields.items():
        assert f.metadata['help'] and '\n' not in f.metadata['help'], k
        assert config.problem(f, agent.schema()[k]) is None, k  # every default passes its own checks
    readme = open(f'{REPO}/README.md').read()
    assert '\n'.join(config.markdown(agent.CONFIGS)) + '\n\n## ' in readme
    r = subprocess.run([sys.executable, 'main_qamc.py', '--help'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert all(f'    {k} (' in r.stdout for k in fields)
    assert '    vt_window (list[int], default [8, 7, 7]): Video Swin window (time, height, width)' in r.stdout
    sides = '[32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448]'
    assert error_of('size_img=0') == f"config error: key 'size_img' must be one of {sides}, got 0 (--set)"
    assert error_of('size_img=100') == f"config error: key 'size_img' must be one of {sides}, got 100 (--set)"  # was a traceback at the first step
    assert error_of('size_frame=8') == "config error: key 'size_frame' must be one of [0, 1, 2, 3, 4, 5, 6], got 8 (--set)"
    assert error_of('lr="x"') == "config error: key 'lr' must be float, got str 'x' (--set)"
    assert error_of('precision=fp8') == "config error: key 'precision' must be one of ['auto', 'fp16', 'bf16', 'fp32'], got 'fp8' (--set)"
    assert agent.load_args(CONFIG, ['lr=1'])['lr'] == 1  # an int where a float goes


# ---------------------------------------------------------------------------------------------- stop signals

def signal_at(monkeypatch, signum, at):
    """The process signals itself during its training step number `at` (1-based), as a scheduler would."""
    calls, step = [0], main_qamc.QAMC.step

    def signalling_step(self, *a):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signum)
        return step(self, *a)
    monkeypatch.setattr(main_qamc.QAMC, 'step', signalling_step)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_resumes_exactly(toy, tmp_path, monkeypatch, signum):
    """SIGTERM / SIGUSR1 (a scheduler's warning before a kill) during a step: the step finishes, resume.pt is saved
    at it, the run stops with the signal named (not 'done'), and --resume ends with the weights of a run never
    stopped. During a unit's last step, the unit's training ends (resume.pt there) and the run stops at its evaluation
    (it used to evaluate and checkpoint first, while a kill may come soon)."""
    whole = qamc(toy, tmp_path / 'whole', 'size_epoch=2')
    before = signal.getsignal(signum)
    signal_at(monkeypatch, signum, 2)
    out = tmp_path / 'stopped'
    name = signal.Signals(signum).name
    assert stops(qamc, toy, out, 'size_epoch=2') == (
        f'stopped by {name} at epoch 1 step 2: resume.pt saved; continue with --resume {out}')
    assert signal.getsignal(signum) is before  # the handler is the run's alone
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 2
    assert not (out / 'ckpt_violet_toy-qamc_1.pt').exists()
    monkeypatch.undo()
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out)])
    for ep in (1, 2):
        a, b = (torch.load(os.path.join(d, f'ckpt_violet_toy-qamc_{ep}.pt'), weights_only=True) for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ep
    # the last step of epoch 1 (16 items, batch 4): its training ends, the run stops at its evaluation
    signal_at(monkeypatch, signum, 4)
    out = tmp_path / 'at_the_end'
    assert stops(qamc, toy, out, 'size_epoch=2') == (
        f'stopped by {name} at the evaluation of epoch 1 (vl): resume.pt saved; continue with --resume {out}')
    assert not (out / 'ckpt_violet_toy-qamc_1.pt').exists()
    state = torch.load(out / 'resume.pt', weights_only=True)
    assert (state['unit'], state['step']) == (0, 4)


@pytest.mark.parametrize('grad_accum, workers, saved_at', [(1, 0, 3), (2, 1, 2)])
def test_bad_sample_mid_unit_saves_and_resumes_exactly(toy, tmp_path, monkeypatch, capsys, grad_accum, workers, saved_at):
    """A sample that cannot be read halfway through a unit (a corrupt frame, found only when it is decoded) stopped
    the run and lost the unit's steps. Now resume.pt is saved at the start of the failing batch's window (with the
    RNG states and sums of that moment), the message stays the sample's one line, and --resume after the fix ends
    with the weights and losses of a run that never failed. Here the 14th training sample (batch 4 of epoch 1)
    fails; head dropout makes the weights depend on the RNG states."""
    sets = ('size_epoch=2', f'grad_accum={grad_accum}', f'num_workers={workers}', 'head_dropout=0.3')
    whole = qamc(toy, tmp_path / 'whole', *sets)
    calls, get_item = [0], main_qamc.QAMC.Dataset.get_item
    said = f'{toy}/img_toy.pkl: frame 2 of video "v" is not a JPEG'

    def failing(self, i):
        calls[0] += self.split == 'train'
        if calls[0] == 14 and self.split == 'train':
            raise dataset.BadSample(said)
        return get_item(self, i)
    monkeypatch.setattr(main_qamc.QAMC.Dataset, 'get_item', failing)
    out = tmp_path / 'failed'
    assert stops(qamc, toy, out, *sets) == said
    assert (f'epoch 1 step {saved_at}: rank 0 could not load its batch; resume.pt saved there: fix the data (or set '
            f'skip_bad: true) and continue with --resume {out}') in capsys.readouterr().out
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == saved_at
    monkeypatch.undo()
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out)])
    for ep in (1, 2):
        a, b = (torch.load(os.path.join(d, f'ckpt_violet_toy-qamc_{ep}.pt'), weights_only=True) for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ep
    assert agent.read_run_log(out) == agent.read_run_log(whole)


def test_killed_without_warning_resumes_from_save_minutes(toy, tmp_path):
    """kill -9 (no signal to catch) mid-epoch: with save_minutes, resume.pt was written inside the epoch (here every
    step: 1e-9 minutes), so --resume loses nothing and ends epochs 1 and 2 with the weights of an unbroken run."""
    whole = qamc(toy, tmp_path / 'whole', 'size_epoch=50', 'stop_after_steps=8')  # 16 items, batch 4: 2 epochs
    out = tmp_path / 'killed'
    cmd = [sys.executable, 'main_qamc.py', CONFIG, '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}',
           f'path_output={out}', 'size_epoch=50', 'size_batch=4', 'save_minutes=1e-9']
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        t0, state = time.time(), None
        while state is None or state['step'] == 0:  # a position inside an epoch
            assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
            if os.path.exists(out / 'resume.pt'):
                state = torch.load(out / 'resume.pt', weights_only=True)
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    state = torch.load(out / 'resume.pt', weights_only=True)  # (it may have moved on before the kill)
    assert state['step'] > 0 and state['unit'] < 2, (state['unit'], state['step'])
    left = 8 - 4 * state['unit'] - state['step']
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', f'stop_after_steps={left}'])
    for ep in (1, 2):
        a, b = (torch.load(os.path.join(d, f'ckpt_violet_toy-qamc_{ep}.pt'), weights_only=True) for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ep


def wait_for_steps(out, proc, n=1, timeout=120):
    t0 = time.time()
    while not (os.path.exists(out / 'steps.jsonl') and len(open(out / 'steps.jsonl').readlines()) >= n):
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.02)


def stopped_step(stderr, out):
    m = re.search(rf'stopped by SIG(TERM|USR1|INT) at epoch \d+ step (\d+): resume.pt saved; continue with --resume {out}$',
                  stderr.strip())
    assert m, stderr[-3000:]
    return int(m.group(2))


def test_stop_signal_during_evaluation_resumes_from_the_units_end(toy, tmp_path, monkeypatch):
    """A stop signal during an evaluation stops it at once (a kill may follow soon): resume.pt is at the end of the
    unit's training, and --resume evaluates, then trains on, to the weights, log (bad samples counted once) and
    steps.jsonl (each evaluation logged once) of an unbroken run."""
    frames = dataset.load_pickle(f'{toy}/img_toy.pkl')
    train = [it['video'] for it in json.load(open(f'{toy}/txt_toy-qamc.json'))['train']]
    dataset.write_pickle({v: f[:2] if v in train[:2] else f for v, f in frames.items()}, f'{toy}/img_toy.pkl')
    sets = ('size_epoch=50', 'stop_after_steps=8', 'skip_bad=true', 'max_skip_frac=0.2', 'log_tb=true')  # 2 epochs of 4
    whole = qamc(toy, tmp_path / 'whole', *sets)
    out = tmp_path / 'run'
    evaluate = agent.Trainer.evaluate
    def signalled_during_evaluation(self, u, tag, ds):
        if (u, tag) == (0, 'vl'):
            os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(self, u, tag, ds)
    monkeypatch.setattr(agent.Trainer, 'evaluate', signalled_during_evaluation)
    assert stops(qamc, toy, out, *sets) == (f'stopped by SIGUSR1 at the evaluation of epoch 1 (vl): resume.pt saved; '
                                            f'continue with --resume {out}')
    monkeypatch.undo()
    state = torch.load(out / 'resume.pt', weights_only=True)
    assert (state['unit'], state['step']) == (0, 4) and 'ckpt_violet_toy-qamc_1.pt' not in os.listdir(out)
    with open(out / 'steps.jsonl', 'a') as f:  # as if a kill had come after the evaluation logged its line
        f.write(json.dumps(dict(step=4, unit='epoch 1', eval={'vl/ac': 0.5})) + '\n')
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out / 'tb')) as tb:  # ... and its scalar
        tb.add_scalar('eval/vl/ac', 0.5, 4)
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out), '--set', 'stop_after_steps=4'])
    for ep in (1, 2):
        a, b = (torch.load(os.path.join(d, f'ckpt_violet_toy-qamc_{ep}.pt'), weights_only=True) for d in (whole, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ep
    log = agent.read_run_log(out)
    assert log == agent.read_run_log(whole) and log['n_skipped'] > 0
    lines = [[{k: v for k, v in json.loads(x).items() if k != 'samples_per_s'} for x in open(d / 'steps.jsonl')]
             for d in (tmp_path / 'whole', out)]
    assert lines[0] == lines[1] and sum('eval' in x for x in lines[1]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tbs = [EventAccumulator(str(d / 'tb')) for d in (tmp_path / 'whole', out)]
    for tb in tbs:
        tb.Reload()
    assert tbs[0].Tags()['scalars'] == tbs[1].Tags()['scalars']
    for tag in tbs[0].Tags()['scalars']:
        got = [[(s.step, s.value if tag != 'train/samples_per_s' else 0) for s in tb.Scalars(tag)] for tb in tbs]
        assert got[0] == got[1], tag


@pytest.mark.parametrize('signum, launch', [(signal.SIGTERM, []), (signal.SIGINT, []),
                                           (signal.SIGINT, ['-m', 'torch.distributed.run', '--nproc_per_node=2'])])
def test_stop_signal_to_the_whole_job_with_workers(toy, tmp_path, signum, launch):
    """A scheduler signals every process of the job, DataLoader workers included: they live on until the run has
    saved (else the run dies of 'DataLoader worker killed by signal' before it can), and the run stops cleanly.
    Ctrl-C in a terminal (SIGINT to the whole job; torchrun passes it on once more) does the same: it was a
    KeyboardInterrupt traceback from every process, and no resume.pt."""
    out = tmp_path / 'job'
    cmd = [sys.executable, *launch, 'main_qamc.py', CONFIG, '--set', f'txt_backbone={REPO}/_data/bert-tiny',
           f'path_data={toy}', f'path_output={out}', 'size_epoch=50', 'size_batch=4', 'num_workers=2']
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        wait_for_steps(out, proc)
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    where = set(re.findall(rf'stopped by {name} at (epoch \d+ step \d+|the evaluation of epoch \d+ \(vl\)): resume.pt '
                           rf'saved; continue with --resume {out}', stderr))
    assert len(where) == 1 and stderr.count('stopped by') == (2 if launch else 1), stderr[-3000:]  # every rank, one place
    step = torch.load(out / 'resume.pt', weights_only=True)['step']
    assert re.fullmatch(rf'epoch \d+ step {step}|the evaluation of epoch \d+ \(vl\)', where.pop())
    assert proc.returncode == 1 and 'KeyboardInterrupt' not in stderr
    if not launch:  # (torchrun itself prints a traceback for the signal it got)
        assert 'Traceback' not in stderr, stderr[-3000:]


def test_a_second_ctrl_c_stops_at_once(toy, tmp_path, monkeypatch):
    """Ctrl-C finishes the step and saves; a second one (a second or more later) stops at once, in one line."""
    monkeypatch.setattr(agent, 'SECOND_CTRL_C', 0.0)
    calls, step = [0], main_qamc.QAMC.step

    def pressed_twice(self, *a):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a)
    monkeypatch.setattr(main_qamc.QAMC, 'step', pressed_twice)
    out = tmp_path / 'run'
    before = signal.getsignal(signal.SIGINT)  # (Python's default_int_handler; SIG_IGN in a job started with '&')
    assert stops(qamc, toy, out, 'size_epoch=2', 'save_every=1') == (
        f'interrupted (Ctrl-C): the steps since its last resume.pt are lost; --resume {out} goes on from there')
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 1
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone with it


def test_stop_signal_to_one_rank_stops_all(toy, tmp_path):
    """Under torchrun, a signal that reaches one rank alone stops every rank at the same step (one reduction), none
    left waiting in a collective; rank 0 saves."""
    out = tmp_path / 'ddp'
    cmd = ['torchrun', '--standalone', '--nproc_per_node=2', 'main_qamc.py', CONFIG, '--set',
           f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}', 'size_epoch=50',
           'size_batch=2']
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        wait_for_steps(out, proc)
        rank0 = int(open(out / '.lock').read().split()[1])  # 'pid N on host'
        ranks = [int(p) for p in subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()]
        other = [p for p in ranks if p != rank0]
        assert rank0 in ranks and len(other) == 1, (rank0, ranks)
        os.kill(other[0], signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    steps = set(re.findall(r'stopped by SIGUSR1 at epoch \d+ step (\d+): resume.pt saved', stderr))
    assert len(steps) == 1 and stderr.count('stopped by SIGUSR1') == 2, stderr[-3000:]  # both ranks, one step
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == int(steps.pop())


SLOW_OR_FAILED_SAVE = """import atexit, os, signal, sys, time
sys.path.insert(0, {repo!r})
import agent, dataset, main_qamc, tasks
real_step, real_save, calls = tasks.Downstream.step, agent.save_torch, [0]


def step(self, model, batch, gen):  # rank 1 receives a stop signal (a scheduler's) during its 2nd training step
    if model.training and os.environ['RANK'] == '1':
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
    return real_step(self, model, batch, gen)


def save_torch(obj, path):  # rank 0's resume.pt: a slow disk (a 2 GB file), or a full one
    if path.endswith('resume.pt'):
        if {fails!r}:
            raise dataset.write_error(path, 'No space left on device')
        time.sleep(3)
    real_save(obj, path)


tasks.Downstream.step, agent.save_torch = step, save_torch
if os.environ['RANK'] == '1':  # what rank 1 saw as it left
    atexit.register(lambda: open(os.path.join({dump!r}, 'rank1'), 'w').write(
        str(os.path.exists(os.path.join({out!r}, 'resume.pt')))))
agent.main(main_qamc.QAMC, {config!r})
"""


@pytest.mark.parametrize('fails', [False, True])
def test_ranks_wait_for_the_resume_file(toy, tmp_path, fails):
    """Under torchrun, a stop signal to rank 1: every rank stops at the same step, but rank 1 left as soon as rank 0
    had its state, and torchrun, seeing it exit, killed rank 0 30 s later, amid the write of a large resume.pt (the
    last steps lost). Now every rank waits for the file. A write that fails (a full disk) stops every rank with rank
    0's message; the others went on to their next collective, where rank 0 never came."""
    out = tmp_path / 'ddp'
    (tmp_path / 'run.py').write_text(SLOW_OR_FAILED_SAVE.format(repo=REPO, config=CONFIG, fails=fails,
                                                                dump=str(tmp_path), out=str(out)))
    proc = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', str(tmp_path / 'run.py'), '--set',
                           f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}',
                           'size_epoch=1', 'size_batch=2', 'num_workers=0'],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode != 0
    if fails:
        said = re.findall(r'could not write \S+/resume.pt: No space left on device', proc.stderr)
        assert len(said) == 2 and not os.path.exists(out / 'resume.pt'), proc.stderr[-3000:]  # (both ranks)
    else:
        assert 'stopped by SIGUSR1 at epoch 1 step 2: resume.pt saved' in proc.stderr, proc.stderr[-3000:]
        assert open(tmp_path / 'rank1').read() == 'True'  # rank 1 left after the file was there
        assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 2


def corrupt_rank1_sample(toy, k):
    """Corrupt a frame of the video that rank 1 of 2 reads as its sample k of epoch 1 (and rank 0 never) -> its id."""
    items = json.load(open(f'{toy}/txt_toy-qamc.json'))['train']
    order = []
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(range(len(items)), num_replicas=2, rank=rank, shuffle=True,
                                                      seed=agent.load_args(CONFIG)['seed'])
        sampler.set_epoch(1)
        order.append([items[i]['video'] for i in sampler])
    vid = order[1][k]
    assert vid not in order[0] and vid not in order[1][:k]  # (else choose another sample)
    frames = pickle.load(open(f'{toy}/img_toy.pkl', 'rb'))
    frames[vid][1] = 'bm90IGEgSlBFRw=='  # base64 of 'not a JPEG'
    pickle.dump(frames, open(f'{toy}/img_toy.pkl', 'wb'))
    return vid


def torchrun_qamc(toy, out, *sets):
    cmd = ['torchrun', '--standalone', '--nproc_per_node=2', 'main_qamc.py', CONFIG, '--set',
           f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}', 'size_epoch=1', *sets]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_bad_sample_on_one_rank_stops_all(toy, tmp_path):
    """Under torchrun, a corrupt frame that only rank 1 reads (its 3rd sample of epoch 1, batch 2): both ranks stop at
    the same step, none left waiting in a collective; rank 0 saves resume.pt there; rank 1 says what was wrong with
    the sample, rank 0 which rank failed."""
    vid = corrupt_rank1_sample(toy, 2)
    out = tmp_path / 'ddp'
    proc = torchrun_qamc(toy, out, 'size_batch=2')
    assert proc.returncode != 0
    assert 'epoch 1 step 1: rank 1 could not load its batch; resume.pt saved there' in proc.stdout, proc.stdout[-2000:]
    assert 'stopped at epoch 1 step 1: rank 1 could not load its batch (its message says why)' in proc.stderr
    # (without its line feed: Python writes a SystemExit's message and its line feed apart, and the ranks now leave
    # together, after resume.pt is written, so the other rank's message may come between)
    said = f'{toy}/img_toy.pkl: video "{vid}" frame 1: cannot decode image (cannot identify image file)'
    assert said in proc.stderr, proc.stderr[-3000:]
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 1


def test_bad_sample_in_an_evaluation_on_one_rank_stops_all(toy, tmp_path):
    """Under torchrun, a corrupt frame that only rank 1 reads in the val split (in the training's evaluation, and in
    eval_retrieval.py's video features): rank 1 says what was wrong, the other stops naming it, none is left in a
    collective (rank 0 ended in 40 lines of gloo's 'Connection closed by peer'; on NCCL it would wait for the
    timeout)."""
    val = json.load(open(f'{toy}/txt_toy-qamc.json'))['val']
    rank0 = {val[i]['video'] for i in agent.eval_indices(len(val), 2, 0, 2, True)[0]}
    retrieval = list(dict.fromkeys(it['video'] for it in json.load(open(f'{toy}/txt_toy-retrieval.json'))['val']))
    vid = next(val[i]['video'] for i in agent.eval_indices(len(val), 2, 1, 2, True)[0]  # rank 1's alone, and its
               if val[i]['video'] not in rank0 and val[i]['video'] in retrieval[(len(retrieval) + 1) // 2:])  # share there
    frames = pickle.load(open(f'{toy}/img_toy.pkl', 'rb'))
    frames[vid][1] = 'bm90IGEgSlBFRw=='  # base64 of 'not a JPEG'
    pickle.dump(frames, open(f'{toy}/img_toy.pkl', 'wb'))
    # (without its line feed: Python writes a SystemExit's message and its line feed apart, and the other rank's
    # message may come between)
    said = f'{toy}/img_toy.pkl: video "{vid}" frame 1: cannot decode image (cannot identify image file)'
    proc = torchrun_qamc(toy, tmp_path / 'ddp', 'size_batch=2')
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-3000:]
    assert 'stopped at the evaluation of epoch 1 (vl): rank 1 could not load its batch (its message says why)' in proc.stderr
    # rank 0 says that resume.pt is there (saved when the training ended) and, not knowing rank 1's error, what to fix
    assert (f"the evaluation of epoch 1 (vl): rank 1 could not load its batch; resume.pt saved at the end of the "
            f"training before it (the evaluation is done again): fix what rank 1's message says (bad data: fix it or "
            f"set skip_bad: true; a killed DataLoader worker: memory? fewer num_workers) and continue with --resume "
            f"{tmp_path / 'ddp'}") in proc.stdout, proc.stdout[-2000:]
    # (torchrun's own traceback of the failed child stays; no rank's)
    assert 'agent.py", line' not in proc.stderr and 'Connection closed' not in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', 'eval_retrieval.py',
                           f'{REPO}/_data/toy/args_toy-retrieval.json', '--splits', 'val', '--out', str(tmp_path / 'ev'),
                           '--ckpt', '',
                           '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', 'path_ckpt='],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-3000:]
    assert 'eval_retrieval: rank 1 could not load its videos (its message says why)' in proc.stderr
    assert 'eval_retrieval.py", line' not in proc.stderr and 'Connection closed' not in proc.stderr, proc.stderr[-3000:]


def test_skipped_samples_of_an_evaluation_are_counted(toy, tmp_path):
    """A bad val sample under skip_bad is skipped, counted in log.json's n_skipped, and past max_skip_frac stops the
    run naming the evaluation."""
    val = json.load(open(f'{toy}/txt_toy-qamc.json'))['val']
    frames = pickle.load(open(f'{toy}/img_toy.pkl', 'rb'))
    frames[val[0]['video']][1] = 'bm90IGEgSlBFRw=='  # base64 of 'not a JPEG'
    pickle.dump(frames, open(f'{toy}/img_toy.pkl', 'wb'))
    n_bad = sum(it['video'] == val[0]['video'] for it in val)
    qamc(toy, tmp_path / 'a', 'skip_bad=true', 'max_skip_frac=0.5')
    assert agent.read_run_log(tmp_path / 'a')['n_skipped'] == n_bad
    assert stops(qamc, toy, tmp_path / 'b', 'skip_bad=true') == (
        f'stopping: {n_bad} of the {len(val)} samples of evaluation vl were bad and skipped, more than max_skip_frac '
        f'0.01 allows; run with skip_bad false to see the first error (or raise max_skip_frac)')


def test_killed_worker_is_not_called_bad_data(toy, tmp_path, monkeypatch, capsys):
    """A DataLoader worker killed mid-unit (the OOM killer) stops the run with resume.pt saved, as a bad sample does,
    but the advice was to fix the data or set skip_bad, which would not help."""
    real = dataset.Dataset_QAMC.get_item

    def get_item(self, idx):
        if torch.utils.data.get_worker_info() is not None and self.split == 'train' and idx == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, idx)
    monkeypatch.setattr(dataset.Dataset_QAMC, 'get_item', get_item)
    assert re.fullmatch(r'stopped at epoch 1 step \d: DataLoader worker \(pid\(s\) \d+\) exited unexpectedly',
                        stops(qamc, toy, tmp_path / 'k', 'num_workers=1'))
    said = capsys.readouterr().out
    assert re.search(r'epoch 1 step \d: rank 0 could not load its batch; resume.pt saved there: fix what the message '
                     r'below says \(a killed DataLoader worker: memory\? fewer num_workers\) and continue with --resume ',
                     said), said[-2000:]
    assert os.path.isfile(tmp_path / 'k' / 'resume.pt')


KILL_RANK1_WORKER = """import multiprocessing, os, signal, sys, time
sys.path.insert(0, {repo!r})
import agent, main_qamc, tasks
real, steps = tasks.Downstream.step, [0]


def step(self, model, batch, gen):  # rank 1's DataLoader worker dies (kill -9, as the OOM killer) during its 2nd step
    if model.training and os.environ['RANK'] == '1':
        steps[0] += 1
        if steps[0] == 2:
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGKILL)
            time.sleep(1)  # SIGCHLD arrives inside the step (torch's handler raised here, amid the step's collectives)
    return real(self, model, batch, gen)


tasks.Downstream.step = step
agent.main(main_qamc.QAMC, {config!r})
"""


def test_killed_worker_on_one_rank_stops_all(toy, tmp_path):
    """Under torchrun, rank 1's DataLoader worker killed: torch's SIGCHLD handler raised in the middle of rank 1's
    forward (RuntimeError from signal_handling.py), rank 0 ended in gloo's 'Connection closed by peer' and no
    resume.pt was written at the step. Now the dead worker is found at the next batch: every rank stops there,
    resume.pt saved."""
    (tmp_path / 'run.py').write_text(KILL_RANK1_WORKER.format(repo=REPO, config=CONFIG))
    out = tmp_path / 'ddp'
    proc = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', str(tmp_path / 'run.py'), '--set',
                           f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}',
                           'size_epoch=1', 'size_batch=2', 'num_workers=1'],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode != 0
    # (found at the next batch not yet queued when the worker died)
    step = re.search(r'epoch 1 step (\d): rank 1 could not load its batch; resume.pt saved there', proc.stdout)
    assert step, proc.stdout[-2000:]
    assert re.search(rf'stopped at epoch 1 step {step[1]}: DataLoader worker \(pid\(s\) \d+\) exited unexpectedly',
                     proc.stderr), proc.stderr[-3000:]
    assert 'signal_handling.py' not in proc.stderr and 'Connection closed' not in proc.stderr, proc.stderr[-3000:]
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == int(step[1])


def test_skipped_batch_on_one_rank_under_torchrun(toy, tmp_path):
    """skip_bad: rank 1's whole batch of its 2nd step is bad. The other rank's forward began with DDP's bucket
    rebuild (a collective of the process's 2nd forward) and waited there for ever; now no rank runs the forward of a
    step that not every rank has a batch for, and the run ends with the sample counted."""
    corrupt_rank1_sample(toy, 1)
    out = tmp_path / 'ddp'
    proc = torchrun_qamc(toy, out, 'size_batch=1', 'skip_bad=true', 'max_skip_frac=0.5')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert agent.read_run_log(out)['n_skipped'] == 1


NAN_LAST_OF_WINDOW = """import atexit, json, os, sys
sys.path.insert(0, {repo!r})
import agent, main_qamc, tasks
real_step, real_optimiser_step, calls, sums = tasks.Downstream.step, agent.Trainer.optimiser_step, [0], []


def step(self, model, batch, gen):  # every rank's 2nd training batch, the last of the 1st grad_accum window: NaN
    loss, losses, accs = real_step(self, model, batch, gen)
    if model.training:
        calls[0] += 1
        if calls[0] == 2:
            loss = loss * float('nan')
    return loss, losses, accs


def optimiser_step(self):  # each optimiser step, the rank's weights after it
    real_optimiser_step(self)
    sums.append(sum(p.double().sum().item() for p in self.raw.parameters()))


real_average, grads = agent.Trainer.average_gradients, {{}}


def average_gradients(self):  # the head's gradients before and after; rank 1 has none for its bias (unused there)
    p = dict(self.raw.named_parameters())
    if os.environ['RANK'] == '1':
        p['fc.3.bias'].grad = None
    before = {{k: None if p[k].grad is None else p[k].grad.tolist() for k in ('fc.3.weight', 'fc.3.bias')}}
    real_average(self)
    grads.update(before=before, after={{k: p[k].grad.tolist() for k in ('fc.3.weight', 'fc.3.bias')}})


tasks.Downstream.step, agent.Trainer.optimiser_step = step, optimiser_step
agent.Trainer.average_gradients = average_gradients
atexit.register(lambda: json.dump(dict(sums=sums, grads=grads),
                                  open(os.path.join({dump!r}, 'sums' + os.environ['RANK']), 'w')))
agent.main(main_qamc.QAMC, {config!r})
"""


def test_untrained_last_batch_of_window_under_torchrun(toy, tmp_path):
    """grad_accum 2 under torchrun: the loss of the window's last batch is non-finite on every rank. DDP syncs the
    gradients at the window's last backward, which was skipped, so the window's first batch was dropped unstepped
    (its samples counted as trained). Now its gradients are averaged by hand and the optimiser steps, as a single
    process does: every window steps once, the ranks' weights the same after each step."""
    (tmp_path / 'run.py').write_text(NAN_LAST_OF_WINDOW.format(repo=REPO, config=CONFIG, dump=str(tmp_path)))
    out = tmp_path / 'ddp'
    proc = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', str(tmp_path / 'run.py'), '--set',
                           f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={out}',
                           'size_epoch=1', 'size_batch=1', 'grad_accum=2', 'num_workers=0'],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'non-finite loss at epoch 1 step 1: step skipped (1 in a row, 1 in all)' in proc.stdout, proc.stdout[-2000:]
    n_train = len(json.load(open(f'{toy}/txt_toy-qamc.json'))['train'])
    n_windows = -(-n_train // 4)  # 2 ranks x size_batch 1 x grad_accum 2
    dumps = [json.load(open(tmp_path / f'sums{rank}')) for rank in (0, 1)]
    sums = [d['sums'] for d in dumps]
    assert len(sums[0]) == n_windows and sums[0] == sums[1]
    # the mean of the ranks' gradients, as DDP's; a parameter without one on a rank counts as 0 there
    (before0, after0), (before1, after1) = [(d['grads']['before'], d['grads']['after']) for d in dumps]
    assert after0 == after1 and before1['fc.3.bias'] is None
    assert torch.allclose(torch.tensor(after0['fc.3.weight']),
                          (torch.tensor(before0['fc.3.weight']) + torch.tensor(before1['fc.3.weight'])) / 2, atol=1e-7)
    assert torch.allclose(torch.tensor(after0['fc.3.bias']), torch.tensor(before0['fc.3.bias']) / 2, atol=1e-7)
    steps = [json.loads(ln) for ln in open(out / 'steps.jsonl') if 'eval' not in ln]
    assert [rec['step'] for rec in steps] == list(range(1, n_windows + 1))


def test_waiting_for_data_is_reported(toy, tmp_path, monkeypatch, capsys):
    """Each unit's line says what share of its time rank 0 waited for batches; over 10 % it says (once) to raise
    num_workers. Here every sample takes 50 ms to load (no workers): most of the time is waiting."""
    item = main_qamc.QAMC.Dataset.__getitem__

    def slow(self, i):
        time.sleep(0.05)
        return item(self, i)
    monkeypatch.setattr(main_qamc.QAMC.Dataset, '__getitem__', slow)
    qamc(toy, tmp_path / 'slow', 'num_workers=0', 'size_epoch=2')
    said = capsys.readouterr().out
    share = int(re.search(r'epoch 1: .* \| waited for data (\d+)%\n', said).group(1))
    assert share > 10, said  # (about half here)
    assert (f'data loading held up training {share}% of epoch 1: raise num_workers (now 0; {agent.usable_cpus()} CPUs '
            f'here)') in said
    assert re.search(r'epoch 2: .* \| waited for data \d+%\n', said) and said.count('held up') == 1  # said once


def test_auto_worker_count(toy, tmp_path, monkeypatch, capsys):
    """num_workers -1 (the default): one worker per CPU of the process's share of the node but one, at most 8; a
    count given is kept. The training loader gets it and the run's first line says it."""
    for cpus, local_world, given, want in ((16, 1, -1, 8), (64, 8, -1, 7), (16, 8, -1, 1), (2, 1, -1, 1), (1, 1, -1, 0),
                                           (96, 1, -1, 8), (2, 1, 4, 4), (64, 1, 0, 0)):
        monkeypatch.setattr(agent, 'usable_cpus', lambda: cpus)
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_world))
        assert agent.loader_workers({'num_workers': given}) == want, (cpus, local_world, given)
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.setattr(agent, 'usable_cpus', lambda: 3)
    made, loader = [], agent.Trainer.loader
    monkeypatch.setattr(agent.Trainer, 'loader', lambda self, *a: made.append(loader(self, *a)) or made[-1])
    qamc(toy, tmp_path / 'auto', 'num_workers=-1')
    assert made and {d.num_workers for d in made} == {2}
    assert 'toy-qamc: 1 process(es) on cpu, 2 DataLoader workers each, output ' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'auto' / 'args.json'))['num_workers'] == -1  # the setting, not this machine's count


def test_workers_still_end_with_their_loader(tmp_path):
    """Workers outlive a stop signal from elsewhere, but not their trainer's own SIGTERM: a process that exits with
    a DataLoader iterator still alive (multiprocessing terminates its workers, then waits for them) exits at once,
    and a signal from another process leaves the worker serving batches."""
    script = tmp_path / 'linger.py'
    script.write_text(f'''import os, signal, sys, time, functools
sys.path.insert(0, {REPO!r})
import torch, agent
loader = torch.utils.data.DataLoader(list(range(1000)), batch_size=1, num_workers=1,
                                     worker_init_fn=functools.partial(agent.outlive_stop_signals, os.getpid()))
it = iter(loader)
next(it)
print(it._workers[0].pid, flush=True)
sys.stdin.readline()  # the test signals the worker meanwhile
print(int(next(it)), flush=True)
it._shutdown_workers = lambda: None  # as when an error leaves the iterator behind: the exit must terminate it
''')
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        os.kill(worker, signal.SIGTERM)  # from another process: ignored
        time.sleep(0.5)
        proc.stdin.write('\n')
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == '1'  # the worker served the next batch
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_answers_checked_before_the_first_step(toy, tmp_path):
    """An answer out of range in the test split stopped the run after a whole epoch of training (when the sample was
    read); now before anything is trained or written, naming the first and counting the others. QA-OE's -1 (not in
    the answer vocabulary) stays allowed."""
    qs = json.load(open(f'{toy}/txt_toy-qamc.json'))
    qs['test'][3]['answer'], qs['test'][5]['answer'] = 7, 'left'
    json.dump(qs, open(f'{toy}/txt_toy-qamc.json', 'w'))
    msg = stops(qamc, toy, tmp_path / 'run')
    assert msg == (f'{toy}/txt_toy-qamc.json["test"][3] (video "{qs["test"][3]["video"]}"): answer 7 not in 0..4 '
                   f'(size_option 5; -1: none of them) (1 more of the split\'s answers out of range)')
    assert not os.path.exists(tmp_path / 'run')
    oe = json.load(open(f'{toy}/txt_toy-qaoe.json'))
    oe['val'][0]['answer'] = -1
    json.dump(oe, open(f'{toy}/txt_toy-qaoe.json', 'w'))
    config = f'{REPO}/_data/toy/args_toy-qaoe.json'
    sets = ['--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}', f'path_output={tmp_path / "oe"}']
    main_qaoe.QAOE(agent.load_args(config, sets[1:])).check_data()  # -1 passes
    oe['val'][1]['answer'] = len(oe['vocab'])
    json.dump(oe, open(f'{toy}/txt_toy-qaoe.json', 'w'))
    with pytest.raises(ValueError, match=rf'txt_toy-qaoe.json\["val"\]\[1\] \(video "[^"]+"\): answer '
                                         rf'{len(oe["vocab"])} not in 0..{len(oe["vocab"]) - 1} \(size_vocab '
                                         rf'{len(oe["vocab"])}; -1: not in it\)$'):
        main_qaoe.QAOE(agent.load_args(config, sets[1:])).check_data()
    with pytest.raises(ValueError, match=rf': answer {len(oe["vocab"])} not in 0..{len(oe["vocab"]) - 1} \(the '
                                         rf'{len(oe["vocab"])} answers of its "vocab"; -1: not in it\)$'):
        main_qaoe.QAOE(agent.load_args(config, sets[1:] + ['size_vocab=0'])).check_data()


def test_more_processes_than_gpus_on_a_node(monkeypatch):
    """torchrun --nproc_per_node=8 on a node with 4 GPUs: ranks 4-7 died in their first CUDA call with 'invalid device
    ordinal'; each now says what to change. (No GPU here: CUDA's answers are stood in for.)"""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert agent.init_dist() == (0, 1, torch.device('cuda', 3)) and chosen == [torch.device('cuda', 3)]
    monkeypatch.setenv('LOCAL_RANK', '4')
    with pytest.raises(SystemExit, match=r'^local rank 4: this node has 4 visible GPU\(s\), one per process: launch at '
                                         r'most that many a node \(--nproc_per_node; CUDA_VISIBLE_DEVICES\)$'):
        agent.init_dist()
    assert len(chosen) == 1


def test_srun_without_torchrun_is_refused(monkeypatch):
    """`srun -n 8 python main_X.py` starts 8 copies without a process group: each trained alone on the first of the 8
    GPUs they all see. Tasks 1-7 stop, saying how to launch. Task 0 (also a batch script's own process), tasks that
    see one GPU each (srun --gpus-per-task=1: a sweep of separate runs), CPU tasks and torchrun's processes run as
    before. (No GPU here: CUDA's answers are stood in for.)"""
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: None)
    monkeypatch.setenv('SLURM_PROCID', '3')
    assert agent.init_dist() == (0, 1, torch.device('cpu'))  # CPU tasks: separate runs
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    with pytest.raises(SystemExit, match=r'^Slurm task 3, started without torchrun, sees 8 GPUs and would train alone '
                                         r'on the first, as every task would. One training over the GPUs: srun '
                                         r'--ntasks-per-node=1 torchrun .*; separate runs: a GPU a task '
                                         r'\(srun --gpus-per-task=1\)$'):
        agent.init_dist()
    monkeypatch.setenv('SLURM_PROCID', '0')
    assert agent.init_dist() == (0, 1, torch.device('cuda', 0))
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('WORLD_SIZE', '1')  # (torchrun's: a process group of one is not made)
    assert agent.init_dist() == (0, 1, torch.device('cuda', 0))
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)  # srun --gpus-per-task=1
    assert agent.init_dist() == (0, 1, torch.device('cuda', 0))
    # srun -N 4 --ntasks-per-node=1 (a run alone on each node, say a sweep): task 3 is its node's first; it was stopped
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    monkeypatch.setenv('SLURM_LOCALID', '0')
    assert agent.init_dist() == (0, 1, torch.device('cuda', 0))
    monkeypatch.setenv('SLURM_LOCALID', '1')
    with pytest.raises(SystemExit, match=r'^Slurm task 3, started without torchrun, sees 8 GPUs'):
        agent.init_dist()


def test_world_size_without_a_launcher_is_one_line(monkeypatch):
    """WORLD_SIZE left set without torchrun: torch's env:// rendezvous gave a 26-line traceback."""
    for k in ('RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match=r'^WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not: launch with '
                                         r'torchrun .*, or unset WORLD_SIZE to run one process$'):
        agent.init_dist()


def by_hand(argvs, timeout=240):
    """One process group of len(argvs) processes started by hand, each with its own command line (as on separate
    nodes, whose disks may differ). -> [(returncode, stderr)] by rank; a hang fails the test, not the suite."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(len(argvs)), LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
               OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=dict(env, RANK=str(r)), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r, argv in enumerate(argvs)]
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.stderr.close()


SHARE_NODE = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == 'bound':  # each process its own CPU, as Slurm's --cpus-per-task binds them
    os.sched_setaffinity(0, {int(os.environ['RANK'])})
import agent
rank, world, device = agent.init_dist()
print('threads', torch.get_num_threads(), 'local', os.environ['LOCAL_WORLD_SIZE'], flush=True)
agent.leave_group()
"""


def by_hand_unset(how):
    """Two processes started by hand as Slurm tasks of one node (RANK, WORLD_SIZE, SLURM_*; no LOCAL_RANK,
    LOCAL_WORLD_SIZE or OMP_NUM_THREADS) -> their outputs."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')}
    env.update(WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, '-c', SHARE_NODE, REPO, how],
                              env=dict(env, RANK=str(r), SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        return [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_processes_started_by_hand_share_the_node(monkeypatch):
    """RANK / WORLD_SIZE set by hand (from Slurm's variables, without torchrun): every process ran as many threads as
    the node has CPUs (2 processes on 2 cores trained 15x slower) and took the whole node's DataLoader workers; on
    GPUs every task of a node took the first (LOCAL_RANK unset: SLURM_LOCALID is its index on the node). Processes
    bound to CPUs of their own (Slurm's --cpus-per-task) keep them."""
    out = by_hand_unset('free')
    threads = max(1, agent.usable_cpus() // 2)
    assert out[0].splitlines()[-2:] == [
        f'2 process(es) on {agent.usable_cpus()} CPU(s) and OMP_NUM_THREADS unset: {threads} thread(s) each '
        f'(torchrun sets 1)',
        f'threads {threads} local 2'], out
    assert out[1].splitlines()[-1] == f'threads {threads} local 2', out
    if agent.usable_cpus() >= 2:
        assert [o.splitlines()[-1] for o in by_hand_unset('bound')] == ['threads 1 local 1'] * 2
    for k in ('LOCAL_RANK', 'WORLD_SIZE', 'SLURM_LOCALID'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('SLURM_LOCALID', '3')
    assert agent.local_rank_of(None, n_gpus=8) == 0  # one process alone: its GPU is the first it sees
    monkeypatch.setenv('WORLD_SIZE', '8')
    assert (agent.local_rank_of(None, 8), agent.local_rank_of(2, 8)) == (3, 2)  # (--local_rank: the legacy launcher's)
    assert agent.local_rank_of(None, n_gpus=1) == 0  # srun --gpus-per-task=1: each task sees its own GPU alone
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert agent.local_rank_of(2, 8) == 1


def test_nodes_that_see_different_files_stop_together(toy, tmp_path):
    """With several nodes each rank reads the run's files from its own disk. A node without the run folder's
    resume.pt stopped alone, and node 0 waited for it, silent, for torch's 30 minutes; a node with a stale copy
    resumed from another position. A batch one rank could not decode past the batches every rank has (a split that
    does not divide among the ranks) gave the other ranks gloo tracebacks. Each now stops every rank with one message."""
    run = qamc(toy, tmp_path / 'run', 'stop_after_steps=1')  # resume.pt at step 1
    sets = ['--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_data={toy}']
    results = by_hand([['main_qamc.py', '--resume', str(run)], ['main_qamc.py', '--resume', str(tmp_path / 'none')]])
    said = f'resume: no resume state at {tmp_path}/none (with several nodes the run folder must be on a disk they all see)'
    rank1 = f'rank 1 (on {socket.gethostname()}): '  # (the others name the rank; it says its own message)
    assert [(rc, err.strip().splitlines()[-1]) for rc, err in results] == [(1, rank1 + said), (1, said)], results
    copy = shutil.copytree(run, tmp_path / 'copy')
    state = torch.load(f'{copy}/resume.pt', weights_only=False)
    state['saved_as'] = 'another save'
    torch.save(state, f'{copy}/resume.pt')
    results = by_hand([['main_qamc.py', '--resume', str(run)], ['main_qamc.py', '--resume', str(copy)]])
    said = ("resume: this rank read another resume.pt than rank 0 (unit 0 step 1, rank 0's unit 0 step 1): with several "
            "nodes the run folder must be one they all see (a shared disk), not a copy on each")
    assert [(rc, err.strip().splitlines()[-1]) for rc, err in results] == [(1, rank1 + said), (1, said)], results
    # the first weights: a checkpoint one node lacks stopped that rank alone, the other in DDP's first collective
    results = by_hand([['main_qamc.py', CONFIG, *sets, f'path_output={tmp_path}/w{r}', f'path_ckpt={ckpt}']
                       for r, ckpt in enumerate([f'{run}/ckpt_violet_toy-qamc_0.pt', f'{tmp_path}/none.pt'])])
    said = f'checkpoint not found: {tmp_path}/none.pt'
    assert [rc for rc, _ in results] == [1, 1] and results[1][1].strip().splitlines()[-1].startswith(said), results
    assert results[0][1].strip().splitlines()[-1].startswith(rank1 + said), results
    # any error (not only the expected kinds) of one rank stops the others with its line
    code = ('import agent; agent.init_dist(); agent.agreed(lambda: agent.get_rank() and open("/") and 0); '
            'print("not here")')
    results = by_hand([['-c', code]] * 2)
    said = rank1 + "IsADirectoryError: [Errno 21] Is a directory: '/'"
    assert results[0] == (1, said + '\n') and 'IsADirectoryError' in results[1][1] and results[1][0] == 1, results
    # val: 8 items in batches of 3 -> rank 0 has batches 0 and 2, rank 1 batch 1: item 6 is past the common batch
    frames = pickle.load(open(f'{toy}/img_toy.pkl', 'rb'))
    vid = json.load(open(f'{toy}/txt_toy-qamc.json'))['val'][6]['video']
    frames[vid][1] = base64.b64encode(b'\xff\xd8\xff not a JPEG').decode()
    pickle.dump(frames, open(f'{toy}/img_toy.pkl', 'wb'))
    evaluate = ['main_qamc.py', CONFIG, '--eval', *sets, 'size_batch=3', f'path_ckpt={run}/ckpt_violet_toy-qamc_0.pt']
    results = by_hand([evaluate + [f'path_output={tmp_path}/ev{r}'] for r in range(2)])
    last = [err.strip().splitlines()[-1] for _, err in results]
    assert [rc for rc, _ in results] == [1, 1] and 'Traceback' not in results[1][1], results
    assert last[0].startswith(f'{toy}/img_toy.pkl: video "{vid}" frame 1: cannot decode image'), last
    # (--eval has no epoch: it said 'the evaluation of epoch 1')
    assert last[1] == 'stopped at the evaluation (val): rank 0 could not load its batch (its message says why)'


def test_demo_keeps_a_folder_that_is_not_its_own(tmp_path):
    """demo.py replaces its --out folder: one holding other files (`--out .`, a home) is refused, untouched; from
    another working directory it found neither its tools nor the toy corpus (a CalledProcessError traceback)."""
    (tmp_path / 'mine.txt').write_text('keep me')
    r = subprocess.run([sys.executable, f'{REPO}/demo.py', '--out', '.'], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (
        1, f"--out {tmp_path} holds files that are not an earlier demo's: the demo replaces its folder, so give a new "
           f"or an earlier demo's one"), r.stderr
    assert (tmp_path / 'mine.txt').read_text() == 'keep me'


def test_tensorboard_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """log_tb on a full disk: tensorboard's writer raised the OSError again at flush, a traceback (steps.jsonl's
    own failure was the one line of a full disk)."""
    log = agent.StepLog(str(tmp_path), True)
    log.evaluation(1, 'epoch 1', {'vl': {'ac': 0.5}})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(log.tb, 'flush', full)
    with pytest.raises(dataset.WriteError, match=rf'^could not write {tmp_path}/tb: No space left on device \(\S+ \S+ '
                                                 r'free on its disk\)$'):
        log.evaluation(2, 'epoch 2', {'vl': {'ac': 0.5}})
    log.close()


def test_resume_with_the_first_command_line_and_derived_counts(toy, tmp_path, monkeypatch):
    """A config whose size_vocab (or size_frame) is 0, derived from the data, is recorded with the count, and one
    whose path_data starts with '~' with the home: the first command line with --resume added (a requeue script's)
    was refused as differing in them, and --set size_vocab=0 as a change of the model's shape."""
    cfg = json.load(open(f'{REPO}/_data/toy/args_toy-qaoe.json'))
    monkeypatch.setenv('HOME', str(tmp_path))
    assert toy == f'{tmp_path}/data'
    json.dump({**cfg, 'size_vocab': 0, 'size_frame': 0, 'path_data': '~/data'}, open(tmp_path / 'cfg.json', 'w'))
    out = tmp_path / 'run'
    argv = [str(tmp_path / 'cfg.json'), '--set', f'txt_backbone={REPO}/_data/bert-tiny', f'path_output={out}',
            'size_epoch=1', 'size_batch=4']
    agent.main(main_qaoe.QAOE, str(tmp_path / 'cfg.json'), argv + ['stop_after_steps=2'])
    saved = json.load(open(out / 'args.json'))
    assert saved['size_vocab'] == 12 and saved['size_frame'] == 5
    agent.main(main_qaoe.QAOE, str(tmp_path / 'cfg.json'), argv + ['stop_after_steps=1', '--resume', str(out)])
    assert torch.load(out / 'resume.pt', weights_only=True)['step'] == 3
    agent.main(main_qaoe.QAOE, str(tmp_path / 'cfg.json'), ['--resume', str(out), '--set', 'size_vocab=0'])
    assert json.load(open(out / 'args.json'))['size_vocab'] == 12 and 'ckpt_violet_toy-qaoe_1.pt' in os.listdir(out)


def test_resume_before_a_units_first_step_keeps_the_last_evaluation(toy, tmp_path, monkeypatch):
    """A stop inside a unit before its first optimiser step (its first batch non-finite, skipped) is at the previous
    unit's evaluation's global step: the resumed run took it for the unit's end and dropped that evaluation's
    steps.jsonl line, which it never does again."""
    calls, step = [0], main_qamc.QAMC.step

    def nan_then_signal(task, model, batch, gen):
        calls[0] += model.training
        loss, losses, hits = step(task, model, batch, gen)
        if calls[0] == 5 and model.training:  # epoch 2's first batch (4 a unit)
            os.kill(os.getpid(), signal.SIGTERM)
            return loss * math.nan, {k: v * math.nan for k, v in losses.items()}, hits
        return loss, losses, hits
    monkeypatch.setattr(main_qamc.QAMC, 'step', nan_then_signal)
    out = tmp_path / 'run'
    assert stops(qamc, toy, out, 'size_epoch=2').startswith('stopped by SIGTERM at epoch 2 step 1')
    monkeypatch.undo()
    evals = lambda: [r['step'] for r in map(json.loads, open(out / 'steps.jsonl')) if 'eval' in r]
    assert evals() == [4]
    agent.main(main_qamc.QAMC, CONFIG, ['--resume', str(out)])
    assert evals() == [4, 7]
