"""What main_pretrain.py, main_qamc.py, main_qaoe.py and main_retrieval.py share: config loading and
validation, distributed setup, loaders, THE training loop, checkpoints, exact resume and logs.

A script defines a Task (tasks.py: datasets, model class, step -> loss and metrics) and calls
`main(TaskClass, default_config)`:

    python main_X.py [CONFIG.json] [--set KEY=VALUE ...] [--resume DIR_OR_FILE]
    python main_X.py [CONFIG.json] --eval --set path_ckpt=CKPT     (evaluation only: val and test, no training)
    torchrun --nproc_per_node=N main_X.py ...          (also: python -m torch.distributed.launch ...)

Helpers other tools import: load_args(path, sets) -> args; init_dist() -> (rank, world, device);
get_rank(), get_world(), is_main(), say(), all_sum(); save_json() / save_torch() / save_safetensors() (atomic).
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import errno
import fcntl
import functools
import inspect
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import threading
import time
import traceback

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import dataset
import model as violet

@dataclasses.dataclass
class TrainConfig:
    """The training run's config keys (config.key: type, default, help; what values each takes); model.ModelConfig
    and dataset.DataConfig hold the others. Every config key is in one of the three."""
    type: str = config.key('', '`pretrain`, `qamc`, `qaoe` or `retrieval`; must match the script (`""`: the script\'s)', choices=('', 'pretrain', 'qamc', 'qaoe', 'retrieval'))
    retrieval_loss: str = config.key('v2t', 'retrieval training loss: `v2t` (the original: each video\'s softmax over the batch\'s texts) or `both` (the mean of that and each text\'s softmax over the batch\'s videos)', choices=('v2t', 'both'))
    size_epoch: int = config.key(5, 'epochs', least=1)
    size_batch: int = config.key(12, 'samples per process and step', least=1)
    lr: float = config.key(2e-5, 'AdamW learning rate (constant), betas (0.9, 0.98)', least=0)
    decay: float = config.key(1e-3, 'AdamW weight decay', least=0)
    path_ckpt: str = config.key('', 'initial weights: a pretraining, official or fine-tuned checkpoint (`load_ckpt`; every encoder key must load)')
    init_partial: bool = config.key(False, 'true: `path_ckpt` may lack encoder keys or hold them in another shape (a deliberate partial load)')
    seed: int = config.key(0, 'seed of initialisation, masking, sampling', least=0, most=2**63 - 1)
    precision: str = config.key('auto', 'training: `auto` (fp16 on CUDA, fp32 on CPU), `fp16` (autocast + GradScaler, the original), `bf16`, `fp32`; `eval_retrieval.py`: `auto` and `fp32` are float32 (the original), `bf16` / `fp16` autocast', choices=('auto', 'fp16', 'bf16', 'fp32'))
    max_grad_norm: float = config.key(0.0, '> 0: clip the global gradient norm', least=0)
    grad_accum: int = config.key(1, 'batches per optimiser step', least=1)
    max_skip_frac: float = config.key(0.01, 'under `skip_bad`: more than this fraction of a unit\'s (or an evaluation\'s) samples skipped stops the run', least=0)
    path_output: str = config.key('', 'output dir; `""`: `_snapshot/_<task>_<time>_<random>` (a new one per run)')
    save_every: int = config.key(0, '> 0: also write `resume.pt` every this many steps inside a part / epoch', least=0)
    save_minutes: float = config.key(30.0, '> 0: also write `resume.pt` inside a part / epoch once this many minutes have passed since the last one (rank 0\'s clock), so that a job killed without warning (kill -9, a lost node) loses at most that; 0: off', least=0)
    save_safetensors: bool = config.key(False, 'also write each checkpoint as `.safetensors` beside the `.pt` (shareable; loading it cannot run code)')
    log_tb: bool = config.key(False, 'also write TensorBoard scalars to `<path_output>/tb` (`steps.jsonl` is always written)')
    stop_after_steps: int = config.key(0, '> 0: stop (resumably) after this many steps of this invocation; not carried over by `--resume` (the resumed run goes to the end unless `--set stop_after_steps=N` is given again)', least=0)
    max_nonfinite: int = config.key(10, 'a non-finite loss skips its step and is counted; this many in a row stop the run', least=1)
    compile: bool = config.key(False, '`torch.compile` the VT blocks (once per kind of block, not per block) and the CT layer (training and `eval_retrieval`; in place, checkpoint keys unchanged; numbers equal within float noise). Compilation takes minutes for the full model; see Benchmark')


DEFAULTS = config.defaults(TrainConfig)
CONFIGS = {'model (model.ModelConfig)': violet.ModelConfig, 'data (dataset.DataConfig)': dataset.DataConfig,
           'training (agent.TrainConfig)': TrainConfig}
FIELDS = config.fields(*CONFIGS.values())


# ----------------------------------------------------------------------------------------------
# config

def schema():
    """Every config key with its default (one flat dict, as the JSON files are)."""
    return {**violet.DEFAULTS, **dataset.DEFAULTS, **DEFAULTS}


TORCH_VERSION = tuple(int(x) for x in re.findall(r'\d+', torch.__version__)[:2])


def config_error(msg):
    return SystemExit(f'config error: {msg}')


def data_errors_in_one_line(fn):
    """A script's main: bad input data (dataset.DataError: a file, key, line or video named in the message) and a
    missing file stop it with that one message, not a traceback through the DataLoader and its worker; so does
    Ctrl-C outside training (training saves first: Trainer.on_signal)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except (dataset.DataError, FileNotFoundError, dataset.WriteError) as e:
                raise SystemExit(error_line(e)) from e
            except KeyboardInterrupt:
                raise SystemExit('interrupted (Ctrl-C)') from None
        except SystemExit:
            # a gloo group left to the interpreter's exit could abort it (status -6). Not before torch 2.8: freeing
            # a group right after a collective could hang for good there (leave_group)
            if dist.is_initialized() and TORCH_VERSION >= (2, 8):
                dist.destroy_process_group()
            raise
    return wrapped


def check_keys(given, where):
    """Unknown key, wrong type or bad value (the fields of CONFIGS say what each takes) -> SystemExit with one
    line naming the key."""
    if where != '--set' and len(given) > 1 and not any(k in FIELDS for k in given):  # (a log.json, a txt_<task>.json)
        raise config_error(f"{where}: not a config, none of its keys is one ({', '.join(map(repr, list(given)[:3]))}"
                           f"{', ...' if len(given) > 3 else ''}): a run's config is its args.json, a task's "
                           f"_data/args_<task>.json")
    for k, v in given.items():
        if k not in FIELDS:
            near = difflib.get_close_matches(k, FIELDS, n=1)
            raise config_error(f"unknown key '{k}' ({where})" + (f"; did you mean '{near[0]}'?" if near else ''))
        wrong = config.problem(FIELDS[k], v)
        if wrong:
            raise config_error(f"key '{k}' {wrong} ({where})")


def parse_value(s):
    """--set values are JSON when they parse (numbers, true, lists, "quoted"), else plain strings."""
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


PATH_KEYS = ('path_data', 'path_output', 'path_ckpt', 'path_vt', 'txt_backbone', 'txt_vocab')


def with_home(args):
    """'~/data' in a path key is the home's (it was looked up, or written, as a folder named '~')."""
    return {k: os.path.expanduser(v) if k in PATH_KEYS and isinstance(v, str) and v.startswith('~') else v
            for k, v in args.items()}


def load_args(path='', sets=(), base=None):
    """All defaults, then the config file at `path` (or `base`, a saved run's args), then --set KEY=VALUE
    overrides; every key validated. -> args dict."""
    args = schema()
    if base is None and path:
        try:
            base = config.read_file(path)
        except config.FileError as e:
            raise config_error(str(e)) from None
    check_keys(base or {}, path or 'saved args')
    given = dict(base or {})
    for kv in sets:
        k, eq, v = kv.partition('=')
        if not eq:
            raise config_error(f"--set takes KEY=VALUE, got '{kv}'")
        check_keys({k: parse_value(v)}, '--set')
        given[k] = parse_value(v)
    args.update(violet.with_preset(given))  # a model_preset fills the model keys the file and --set leave out
    args = with_home(args)
    wrong = violet.config_problem(args)
    if wrong:
        raise config_error(wrong)
    return args


def parse_cli(default_config, argv=None):
    p = argparse.ArgumentParser(description='VIOLET training', epilog=config.help_text(CONFIGS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', default=None, help=f'JSON config (default {default_config})')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='override config keys; VALUE parsed as JSON when possible, else a string')
    p.add_argument('--resume', default='', metavar='DIR_OR_FILE',
                   help="continue a stopped run (its output dir or resume.pt) in the same dir; the run's saved "
                        'args are used (except stop_after_steps), --set still applies')
    p.add_argument('--overwrite', action='store_true',
                   help="replace another run's files in path_output (without it such a folder is refused)")
    p.add_argument('--eval', action='store_true',
                   help="evaluation only: the val and test splits with the weights of path_ckpt (every model key "
                        "must come from it), no optimiser step; writes eval.json beside args.json")
    p.add_argument('--local_rank', '--local-rank', type=int, default=None,
                   help='set by torch.distributed.launch; the LOCAL_RANK env var wins')
    cli = p.parse_args(argv)
    cli.config_given, cli.config = cli.config is not None, cli.config or default_config
    return cli


# ----------------------------------------------------------------------------------------------
# distributed

def init_dist(local_rank=None):
    """Join the process group when launched by torchrun / torch.distributed.launch (WORLD_SIZE > 1; multi-node
    through torchrun's rendezvous); a plain `python script.py` runs alone without one.
    NCCL on CUDA, gloo on CPU. -> (rank, world, device)."""
    local_rank = local_rank_of(local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    task = os.environ.get('SLURM_PROCID', '0')
    on_node = os.environ.get('SLURM_LOCALID', task)  # the task's index on its node
    if 'WORLD_SIZE' not in os.environ and on_node.isdigit() and int(on_node) > 0 and not torch.cuda.is_available():
        print(f'note: Slurm task {task} started without torchrun trains alone, as every task of the step does (one '
              f'training over several processes: srun --ntasks-per-node=1 torchrun --nproc_per_node=N ...)', flush=True)
    if ('WORLD_SIZE' not in os.environ and on_node.isdigit() and int(on_node) > 0 and torch.cuda.is_available()
            and torch.cuda.device_count() > 1):
        # `srun -n 8 python main_X.py`: 8 copies, each training alone on the first of the GPUs they all see. (The
        # first task of a node goes on: a batch script's own process is one too, and `srun -N 2
        # --ntasks-per-node=1` runs one alone on each node. Tasks given a GPU each are separate runs, as a sweep.)
        raise SystemExit(f'Slurm task {task}, started without torchrun, sees {torch.cuda.device_count()} GPUs and would '
                         f'train alone on the first, as every task would. One training over the GPUs: srun '
                         f'--ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=GPUS '
                         f'--rdzv_backend=c10d --rdzv_endpoint=HOST:29500 main_X.py ...; separate runs: a GPU a task '
                         f'(srun --gpus-per-task=1)')
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # (torch: 'CUDA error: invalid device ordinal', at the first use)
            raise SystemExit(f'local rank {local_rank}: this node has {torch.cuda.device_count()} visible GPU(s), one per '
                             f'process: launch at most that many a node (--nproc_per_node; CUDA_VISIBLE_DEVICES)')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        missing = [k for k in ('RANK', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing:  # (torch's env:// rendezvous: a 26-line traceback)
            raise SystemExit(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} not: launch with "
                             f"torchrun (one process per GPU or CPU share), or unset WORLD_SIZE to run one process")
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        share_node()
    return get_rank(), get_world(), device


def local_rank_of(given, n_gpus=0):
    """This process's index on its node (its GPU): torchrun's LOCAL_RANK, else the legacy launcher's --local_rank,
    else, for processes started by hand with RANK / WORLD_SIZE (from Slurm's variables) that see several GPUs,
    SLURM_LOCALID (without it every task of a node took the first); else 0 (a task given its own GPU sees it alone,
    srun --gpus-per-task=1)."""
    if 'LOCAL_RANK' in os.environ:
        return int(os.environ['LOCAL_RANK'])
    if given is not None:
        return given
    slurm = os.environ.get('SLURM_LOCALID', '')
    by_hand = int(os.environ.get('WORLD_SIZE', '1')) > 1 and slurm.isdigit()
    return int(slurm) if by_hand and int(slurm) < n_gpus else 0


def share_node():
    """What torchrun sets and a launch by hand (RANK / WORLD_SIZE from Slurm's variables) does not: the processes
    that share this one's CPUs (LOCAL_WORLD_SIZE, for the DataLoader workers' share), and OMP_NUM_THREADS. Without
    it every process ran as many threads as the node has CPUs: 2 processes on 2 cores trained 15x slower. Processes
    of the node bound to other CPUs (Slurm's --cpus-per-task) do not count. Collective."""
    host, cpus = socket.gethostname(), set(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    local = sum(h == host and (cpus is None or c is None or bool(cpus & c)) for h, c in gather_objects((host, cpus)))
    os.environ.setdefault('LOCAL_WORLD_SIZE', str(local))
    threads = max(1, usable_cpus() // local)
    if 'OMP_NUM_THREADS' not in os.environ and (local > 1 or threads < torch.get_num_threads()):
        torch.set_num_threads(threads)
        say(f'{local} process(es) on {usable_cpus()} CPU(s) and OMP_NUM_THREADS unset: {threads} thread(s) each '
            f'(torchrun sets 1)')


def leave_group():
    """End the process group at a run's end. The barrier first: torch before 2.8 could hang for good when a gloo
    group was freed while its worker thread still released the last collective's tensors (it waited for the GIL
    the freeing thread held)."""
    if dist.is_initialized():
        # on NCCL the barrier is told the rank's own GPU (else torch warns that it guesses it)
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == 'nccl' else None)
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


say = violet.say  # print on rank 0 alone


def all_reduce(values, op=None):
    """Sum (or `op`) a list of numbers over ranks -> list of floats; no-op alone."""
    if get_world() == 1:
        return [float(v) for v in values]
    dev = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def all_sum(values):
    return all_reduce(values)


def gather_objects(obj):
    """-> list of every rank's obj (rank order)."""
    if get_world() == 1:
        return [obj]
    out = [None] * get_world()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# files: written through dataset.write_atomic (a tmp file in the same dir, then renamed), so a crash never leaves
# half a file and a full disk stops the run with one line naming the file

def save_json(obj, path):
    dataset.write_json(obj, path, indent=2)


def save_torch(obj, path):
    dataset.write_torch(obj, path)


def save_safetensors(state_dict, path):
    # safetensors refuses tensors that share memory (BERT's MLM head ties two biases): each key gets its own copy
    data = safetensors.torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()})

    def write(tmp):  # written by Python, so a failed write is the OS's error (save_file raises its own kind)
        with open(tmp, 'wb') as f:
            f.write(data)
    dataset.write_atomic(path, write)


# ----------------------------------------------------------------------------------------------
# randomness: global RNGs (dropout, VTM negatives) are saved in resume states; masking and loaders use
# generators seeded from the position, so a resumed run replays exactly what an unbroken one does

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = dict(python=random.getstate(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    random.setstate(s['python'])
    name, keys, pos, has_gauss, gauss = s['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s['torch'])
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s['cuda'])


def seed_of(*position):
    """A 63-bit seed from a tuple of ints (deterministic: int tuples hash the same in every process)."""
    return hash(tuple(position)) & (2**63 - 1)


def generator(device, *position):
    return torch.Generator(device).manual_seed(seed_of(*position))


# ----------------------------------------------------------------------------------------------
# the training loop

class Trainer:
    def __init__(self, task, device, state=None, need=None, out=''):
        """need: what path_ckpt must fill (model.load_ckpt); None: 'encoders', or 'any' under init_partial.
        out: the run's folder (checkpoints, resume.pt, logs); fit(out) may name it later."""
        self.task, self.args, self.device = task, task.args, device
        self.rank, self.world = get_rank(), get_world()
        args = self.args
        self.precision = args['precision']
        if self.precision == 'auto':
            self.precision = 'fp16' if device.type == 'cuda' else 'fp32'

        need = need or (('any' if args['init_partial'] else 'encoders') if state is None else None)
        # (agreed: a checkpoint one node's disk lacks stops every rank, not that rank alone before DDP's collective)
        self.raw, self.not_loaded, self.unused = agreed(self.initial_model, state, need)
        if args['compile']:
            self.raw.compile_blocks()
        self.model = self.raw
        if self.world > 1 and need != 'all':  # need 'all': evaluation only, no DDP
            # every parameter takes part in every task's loss, so DDP needs no search for unused ones (a costly
            # extra pass over the autograd graph); buffers are constants and need no syncing
            DDP = torch.nn.parallel.DistributedDataParallel
            no_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                       else {'broadcast_buffers': False})  # torch >= 2.13 deprecates broadcast_buffers
            self.model = DDP(self.raw, device_ids=[device.index] if device.type == 'cuda' else None,
                             find_unused_parameters=task.unused_parameters, **no_sync)
        self.optim = torch.optim.AdamW(self.raw.parameters(), lr=args['lr'], betas=(0.9, 0.98),
                                       weight_decay=args['decay'], fused=device.type in ('cuda', 'cpu'))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == 'fp16')
        self.log = task.new_log()
        # n_overflow: optimiser steps fp16's GradScaler skipped (inf/NaN gradients; it then halves its scale)
        self.log.update(n_skipped=0, n_nonfinite=0, n_overflow=0, not_loaded=self.not_loaded)
        self.unit, self.step = 0, 0       # position: next unit, batches of it already done
        self.global_step = 0              # optimiser steps (windows) of the whole run: the curves' x axis
        self.steplog = None               # rank 0's StepLog, opened by fit
        self.out = out
        self.steps_run = 0                # optimiser windows run by this invocation (stop_after_steps)
        self.pending = 0                  # backward passes since the last optimiser step
        self.speed = 0.0                  # samples/s of the last unit, over the ranks
        self.data_wait = 0.0              # the share of the last unit's time rank 0 waited for its DataLoader
        self.data_warned = False          # said once per invocation that the loader held training up
        self.nonfinite_run = 0            # consecutive non-finite steps (same on every rank)
        self.evaluating_only = False      # --eval: no unit, no resume.pt (evaluate's messages)
        self.signalled = 0                # a stop signal this process received (fit's handlers), 0 when none
        self.ctrl_c_at = 0.0              # when it came (time.monotonic)
        self.last_resume = time.time()    # when resume.pt was last written (or this invocation started): save_minutes
        self.local = self.fresh_local()   # this rank's running sums of the current unit
        if state is None:
            seed_all(args['seed'] * 1000 + self.rank)  # dropout differs per rank
        else:
            self.load_state(state)

    def initial_model(self, state, need):
        """The task's model on the device with its first weights: path_ckpt's (what `need` says it must fill), or
        resume.pt's. -> (model, keys not loaded, keys of the file not used)."""
        seed_all(self.args['seed'])  # the same initial weights on every rank
        raw = self.task.build_model().to(self.device)
        if state is None:
            return (raw, *raw.load_ckpt(self.args['path_ckpt'], need))
        own, saved = raw.state_dict(), state['model']
        misfit = {k: 'missing' if k not in saved else violet.misfit_tensor(saved[k], v) for k, v in own.items()}
        misfit = {k: why for k, why in misfit.items() if why}
        misfit.update({k: 'not a key of the model' for k in saved if k not in own})
        if misfit:  # (load_state_dict's RuntimeError traceback, or NaN weights loaded)
            raise violet.CheckpointError(f"resume: resume.pt's weights do not fit the model at {len(misfit)} key(s), "
                                         f"e.g. {'; '.join(f'{k}: {why}' for k, why in list(misfit.items())[:3])}: "
                                         f'a damaged file?')
        raw.load_state_dict(saved)
        return raw, state['log'].get('not_loaded', []), []

    def fresh_local(self):
        return dict(sums={}, counts={}, n_samples=0, n_skipped=0)  # counts: steps with each loss; n_samples: trained on

    def autocast(self):
        if self.precision in ('fp16', 'bf16'):
            return torch.autocast(self.device.type, dtype=torch.float16 if self.precision == 'fp16' else torch.bfloat16)
        return contextlib.nullcontext()

    def loader(self, ds, indices, *position):
        # its own generator: creating an iterator never touches the global RNG (exact resume)
        return torch.utils.data.DataLoader(
            ds, batch_size=self.args['size_batch'], sampler=indices, num_workers=loader_workers(self.args),
            collate_fn=dataset.collate_skip, pin_memory=self.device.type == 'cuda',
            worker_init_fn=functools.partial(outlive_stop_signals, os.getpid()),
            generator=torch.Generator().manual_seed(seed_of(*position)))

    def to_device(self, batch):
        return [x.to(self.device, non_blocking=True) for x in batch]

    # ---- one unit of training
    def train_unit(self, u, unit):
        """Train on the unit's data from batch self.step on. -> mean losses, or None when stopped early."""
        args, B = self.args, self.args['size_batch']
        ds = self.task.train_set(unit)
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=self.world, rank=self.rank, shuffle=True,
                                                      seed=args['seed'])
        sampler.set_epoch(unit['epoch'])
        indices = list(sampler)
        n_batch = batches_per_rank(len(ds), self.world, B)
        if self.step >= n_batch:  # resumed from the unit's end, before its evaluation
            losses = self.unit_losses(unit['name'], len(ds), 0, 0.0)
            self.speed = None
            return losses
        loader = self.loader(ds, indices[self.step * B:], args['seed'], u, self.step, self.rank)
        self.model.train()
        self.pending = 0
        window = new_window()  # rank 0's losses since the last logged step
        t0, n_samples, waited = time.time(), 0, [0.0]
        bar = tqdm(timed(loader, waited), total=n_batch, initial=self.step, disable=not is_main(), ascii=True,
                   desc=unit['name'])
        window_start = self.position()  # what resume.pt holds if this window's data fails
        try:  # the bar shows where the unit stopped, also when it stops early
            for i, item in enumerate(bar, start=self.step):
                failed, (batch, n_skip) = (item, (None, 0)) if isinstance(item, Exception) else (None, item)
                self.local['n_skipped'] += n_skip
                last_of_window = (i + 1) % args['grad_accum'] == 0 or i + 1 == n_batch
                if batch is not None:
                    batch = self.to_device(batch)
                    n_samples += len(batch[0])
                try:
                    r = self.train_step(batch, generator(self.device, args['seed'], u, i, self.rank), last_of_window,
                                        failed=failed is not None)
                except torch.OutOfMemoryError as e:  # torch's traceback says where, not what to change
                    raise SystemExit(self.out_of_memory(e, f"{unit['name']} step {self.step}")) from None
                if r['failed']:
                    bar.close()  # (before the stop message)
                    self.save_resume(window_start)
                    self.stop_for_data(failed, r['failed'] - 1, f"{unit['name']} step {self.step}")
                # more skipped than max_skip_frac allows (the sum over ranks is larger still): stop, keeping the unit's
                # steps in resume.pt (at the window's start, or once this step is done)
                too_many = r['most_skipped'] > args['max_skip_frac'] * len(ds)
                if too_many and not last_of_window:
                    bar.close()
                    self.save_resume(window_start)
                    raise SystemExit(self.too_many_skipped(r['most_skipped'], len(ds), unit['name']))
                if r['nonfinite']:
                    self.count_nonfinite(unit['name'], i)
                if r['losses'] is not None:
                    self.nonfinite_run = 0
                    self.add_losses(r['loss'], r['losses'], len(batch[0]), window, bar)
                if not last_of_window:
                    continue
                if r['stepped']:
                    self.global_step += 1
                    if self.steplog and window['n']:
                        self.steplog.train(self.global_step, unit['name'], i + 1, window, self.optim.param_groups[0]['lr'])
                        window = new_window()
                self.step = i + 1
                self.steps_run += 1
                window_start = self.position()
                if too_many:
                    bar.close()
                    self.save_resume()
                    raise SystemExit(self.too_many_skipped(r['most_skipped'], len(ds), unit['name']))
                if (r['resume_due'] or args['save_every'] and self.step % args['save_every'] == 0) and self.step < n_batch:
                    self.save_resume()
                if r['signalled'] and self.step < n_batch:  # (at the unit's end it finishes the unit first)
                    bar.update(self.step - bar.n)  # (tqdm counts a batch when the next is fetched; leaving the loop closes it)
                    self.save_resume()
                    raise SystemExit(self.stopped_by(r['signalled'], f"{unit['name']} step {self.step}"))
                if self.step < n_batch and self.stop_asked():
                    bar.update(self.step - bar.n)
                    bar.close()
                    self.save_resume()
                    self.say_stopped()
                    return None
        finally:
            bar.close()
        self.data_wait = waited[0] / max(time.time() - t0, 1e-9)
        sec = time.time() - t0
        self.save_resume()  # the unit trained: a kill or a stop signal during its evaluation loses the evaluation alone
        return self.unit_losses(unit['name'], len(ds), n_samples, sec)

    def train_step(self, batch, gen, last_of_window=True, failed=False):
        """One batch of training: a reduction over the ranks, so that a step is trained on every rank or on none (not
        when a rank has no batch); forward; a reduction of whether every loss is finite (else none is trained);
        backward (DDP syncs the gradients only at the window's last batch); at the last batch of a grad_accum window,
        the optimiser step.
        batch: on the device, or None when every sample of this rank's batch was bad or (failed) its loading failed.
        -> dict(loss, losses (None when not trained), nonfinite (a rank's loss was not finite), most_skipped (bad
        samples skipped in this unit by the rank that skipped most), stepped (the optimiser stepped), signalled (a
        stop signal some rank received, 0 when none), failed (1 + the first rank whose loading failed, 0 when none:
        then nothing is trained or stepped, the run is to stop))."""
        # before the forward, which DDP may start with a collective of its own (the bucket rebuild of its second
        # forward) that a rank without a batch would leave waiting: the min of present, -max of the ranks' skip counts
        # and of their stop signals, the first rank whose loading failed, whether rank 0 finds a resume.pt due (its
        # clock decides for all: save_minutes); after it, whether every loss is finite and
        # the stop signals again (one that came during the forward stops the run at this step)
        min_over_ranks = dist.ReduceOp.MIN if self.world > 1 else None
        present, most_skipped, signalled, first_failed, resume_due = all_reduce(
            [batch is not None, -self.local['n_skipped'], -self.signalled, self.rank + 1 if failed else self.world + 1,
             -self.resume_due()], min_over_ranks)
        out = dict(loss=None, losses=None, nonfinite=False, most_skipped=int(-most_skipped), stepped=False,
                   signalled=int(-signalled), failed=0, resume_due=bool(resume_due))
        if first_failed <= self.world:
            return {**out, 'failed': int(first_failed)}
        trained = False
        if present:
            sync = last_of_window or self.world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():  # DDP decides at the forward
                with self.autocast():
                    loss, losses, _ = self.task.step(self.model, batch, gen)
                finite, signalled = all_reduce([bool(torch.isfinite(loss)), -self.signalled], min_over_ranks)
                trained = bool(finite)
                if trained:
                    self.scaler.scale(loss / self.args['grad_accum']).backward()
                    self.pending += 1
            out.update(loss=loss, losses=losses if trained else None, nonfinite=not trained, signalled=int(-signalled))
        if not trained and last_of_window and self.world > 1 and self.pending:
            self.average_gradients()  # the window's DDP all-reduce never ran (its last backward was skipped)
        out['stepped'] = last_of_window and self.pending > 0
        if out['stepped']:
            self.optimiser_step()
        if last_of_window:
            self.optim.zero_grad(set_to_none=True)
            self.pending = 0
        return out

    def average_gradients(self):
        """DDP's mean of the gradients over the ranks, by hand: for a grad_accum window whose last batch no rank
        trained (DDP syncs at the last backward), so that its earlier batches step as in a single process. pending is
        the same on every rank (present and finite are agreed); a parameter without a gradient on some rank (unused
        there) takes zeros, one without any on every rank stays without."""
        params = [p for p in self.raw.parameters() if p.requires_grad]
        has = all_reduce([p.grad is not None for p in params], dist.ReduceOp.MAX)
        for p, any_rank in zip(params, has):
            if any_rank:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def count_nonfinite(self, where, i):
        self.log['n_nonfinite'] += 1
        self.nonfinite_run += 1
        say(f'\nnon-finite loss at {where} step {i}: step skipped '
            f'({self.nonfinite_run} in a row, {self.log["n_nonfinite"]} in all)')
        if self.nonfinite_run >= self.args['max_nonfinite']:
            raise SystemExit(f'stopping: {self.nonfinite_run} consecutive non-finite losses '
                             f'(max_nonfinite={self.args["max_nonfinite"]}) at {where} step {i}; '
                             f'try precision bf16/fp32, a lower lr or max_grad_norm')

    def add_losses(self, loss, losses, n_samples, window, bar):
        """A trained batch into this rank's unit sums (and on rank 0 into the log window and the bar). A loss that is
        NaN had no target in the batch (no masked word): it is left out of its mean, as the original's pretraining
        left out its NaN (the mean of an empty cross-entropy), not averaged in as 0. (Its fine-tuning averaged the NaN
        of a QA-OE batch of only out-of-vocabulary answers in, so the epoch's ls_tr was NaN; README says so.)"""
        values = {k: v.item() for k, v in (('loss', loss), *losses.items())}
        add_to(self.local, {k: v for k, v in values.items() if k != 'loss'})
        self.local['n_samples'] += n_samples
        if is_main():
            bar.set_postfix(loss=f'{values["loss"]:.3f}')
            add_to(window, values)
            window['n'] += 1
            window['n_samples'] += n_samples

    def unit_losses(self, where, n_data, n_samples, sec):
        """The unit's mean losses over every rank's finite steps (each loss over those that had its targets: None when
        none had); sets self.speed (samples/s over the ranks)."""
        keys = self.task.losses  # fixed names: a rank without a finite step still sends every sum
        tot = all_sum([self.local['sums'].get(k, 0.0) for k in keys] + [self.local['counts'].get(k, 0) for k in keys] +
                      [self.local['n_samples'], self.local['n_skipped'], n_samples])
        n_trained, n_skipped = int(tot[-3]), int(tot[-2])
        if n_trained == 0:  # never a "done" run (and never a loss of 0.0) without data
            if n_skipped == 0:  # (every step's loss non-finite, too few in a row for max_nonfinite)
                raise SystemExit(f'stopping: {where} trained on no sample: the loss of every step was non-finite; '
                                 f'try a lower lr, max_grad_norm or precision bf16/fp32')
            raise SystemExit(f'stopping: {where} trained on no sample ({n_skipped} of {n_data} skipped as bad, '
                             f'the other steps non-finite); see the first error with skip_bad false')
        if n_skipped > self.args['max_skip_frac'] * n_data:
            raise SystemExit(too_many_skipped(n_skipped, n_data, where, self.args['max_skip_frac']))
        self.log['n_skipped'] += n_skipped
        self.speed = tot[-1] / max(sec, 1e-9)
        counts = tot[len(keys):2 * len(keys)]
        return {k: tot[j] / counts[j] if counts[j] else None for j, k in enumerate(keys)}

    def optimiser_step(self):
        if self.args['max_grad_norm'] > 0:
            self.scaler.unscale_(self.optim)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.args['max_grad_norm'])
        self.scaler.step(self.optim)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # (fp16)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # (every rank: their gradients are the same)
            self.log['n_overflow'] += 1

    @torch.no_grad()
    def evaluate(self, u, tag, ds):
        """Accuracy over the whole split (eval_indices: no padding), hits summed over the ranks."""
        mine, n_common = eval_indices(len(ds), self.args['size_batch'], self.rank, self.world, self.task.eval_blocks)
        loader = self.loader(ds, mine, self.args['seed'], u, -1, self.rank)
        self.raw.eval()
        metrics = self.task.metrics
        sums, n_skipped, n_samples, failed, stopped = [0.0] * (2 * len(metrics)), 0, 0, None, 0
        where = f'the evaluation ({tag})' if self.evaluating_only else \
            f'the evaluation of {self.task.units()[u]["name"]} ({tag})'
        saved = None if self.evaluating_only else 'at the end of the training before it (the evaluation is done again)'
        batches = tqdm(timed(loader, [0.0]), total=len(loader), disable=not is_main(), ascii=True, desc=f'eval {tag}')
        for i, item in enumerate(batches):
            failed = item if isinstance(item, Exception) else None
            # a stop signal, or a batch a rank could not load, stops every rank at this batch (none is left waiting
            # in a collective); past the batches every rank has, this rank leaves the loop and the ranks agree below
            flags = [self.signalled, self.rank + 1 if failed is not None else 0]
            if self.world > 1 and i >= n_common:
                if any(flags):
                    stopped = flags[0]
                    break
            elif self.world > 1:
                flags = all_reduce(flags, dist.ReduceOp.MAX)
            signalled, first_failed = map(int, flags)
            if first_failed:
                batches.close()
                self.stop_for_data(failed, first_failed - 1, where, saved)
            if signalled:  # a stop signal: stop now, not after the whole evaluation (a kill may come first);
                # resume.pt is at the end of the unit's training, from which --resume evaluates
                raise SystemExit(self.stopped_by(signalled, where))
            batch, n_skip = item
            n_skipped += n_skip
            if batch is None:
                continue
            n_samples += len(batch[0])
            with self.autocast():
                _, _, hits = self.task.step(self.raw, self.to_device(batch),
                                            generator(self.device, self.args['seed'], u, i, self.rank, 1))
            for j, k in enumerate(metrics):
                sums[2*j] += float(hits[k][0])
                sums[2*j+1] += float(hits[k][1])
        flags = all_reduce([self.rank + 1 if failed is not None else 0, stopped],
                           dist.ReduceOp.MAX if self.world > 1 else None)
        batches.close()
        if flags[0]:  # (a rank's batch past those every rank has)
            self.stop_for_data(failed, int(flags[0]) - 1, where, saved)
        if flags[1]:
            raise SystemExit(self.stopped_by(int(flags[1]), where))
        tot = all_sum(sums + [n_skipped, n_samples])
        n_skipped, n_samples = int(tot[-2]), int(tot[-1])
        if n_samples == 0:
            raise SystemExit(f'stopping: evaluation {tag} had no sample ({n_skipped} of {len(ds)} skipped as bad)')
        if n_skipped > self.args['max_skip_frac'] * len(ds):
            raise SystemExit(too_many_skipped(n_skipped, len(ds), f'evaluation {tag}', self.args['max_skip_frac']))
        self.log['n_skipped'] += n_skipped
        # a metric without any target is null, never 0.0
        return {k: tot[2*j] / tot[2*j+1] if tot[2*j+1] else None for j, k in enumerate(metrics)}

    # ---- checkpoints, resume, log
    def resume_due(self):
        """On rank 0: save_minutes have passed since the last resume.pt (or the start of this invocation)."""
        minutes = self.args['save_minutes']
        return bool(minutes) and is_main() and time.time() - self.last_resume >= 60 * minutes

    def position(self):
        """This rank's RNG states, running sums and non-finite counts now: with the weights, the optimiser and
        self.step, where training stands before the next batch is fetched."""
        return dict(rng=rng_state(), local=copy.deepcopy(self.local), nonfinite_run=self.nonfinite_run,
                    n_nonfinite=self.log['n_nonfinite'])

    def save_resume(self, at=None):
        """resume.pt: weights, optimiser, scaler, position, log and every rank's RNG states and running sums (those
        of `at`, a position() taken at self.step, when given). Collective: every rank calls it at the same point;
        rank 0 writes."""
        at = at or self.position()
        self.last_resume = time.time()
        ranks = gather_objects(dict(rng=at['rng'], **at['local']))

        def write():
            if not is_main():
                return
            # (the units by name and the unit's sample count: a resume checks that its position still means the same)
            units = self.task.units()
            size = self.task.unit_size(units[self.unit]) if self.unit < len(units) else None
            save_torch(dict(model=self.raw.state_dict(), optim=self.optim.state_dict(), scaler=self.scaler.state_dict(),
                            unit=self.unit, step=self.step, nonfinite_run=at['nonfinite_run'],
                            units=[u['name'] for u in units], unit_size=size,
                            log={**self.log, 'n_nonfinite': at['n_nonfinite']},
                            global_step=self.global_step, saved_as=secrets.token_hex(8),  # (same_resume_state)
                            ranks=ranks, world=self.world, args=self.args), os.path.join(self.out, 'resume.pt'))
        # every rank waits for the file: one that stopped at once (a stop signal) had torchrun kill rank 0 amid a
        # large write, 30 s later; and a write that fails (a full disk) stops every rank with its message
        agreed(write)

    def load_state(self, state):
        self.check_position(state)
        self.optim.load_state_dict(state['optim'])
        # the saved param groups hold the run's lr and decay: a `--set lr=` on resume changed args.json alone
        was = {'lr': self.optim.param_groups[0]['lr'], 'decay': self.optim.param_groups[0]['weight_decay']}
        for g in self.optim.param_groups:
            g['lr'], g['weight_decay'] = self.args['lr'], self.args['decay']
        changed = [f'{k} {a} -> {self.args[k]}' for k, a in was.items() if a != self.args[k]]
        if state['scaler']:
            self.scaler.load_state_dict(state['scaler'])
        self.unit, self.step, self.nonfinite_run, self.log = state['unit'], state['step'], state['nonfinite_run'], state['log']
        if changed and self.unit < len(self.task.units()):  # (a finished run trains nothing: said by fit)
            say(f'resume: {", ".join(changed)} from here on')
        self.log.setdefault('n_overflow', 0)  # (absent from resume files of earlier versions)
        self.global_step = state.get('global_step', 0)  # absent from resume files of earlier versions
        if state['world'] == self.world:
            mine = state['ranks'][self.rank]
            set_rng_state(mine['rng'])
            self.local = {**self.fresh_local(), **{k: mine[k] for k in ('sums', 'n_samples', 'n_skipped') if k in mine}}
            self.local['counts'] = mine.get('counts', {k: mine.get('n', 0) for k in self.local['sums']})  # (earlier files)
        elif state['step'] == 0 or self.trained_through(state):  # another process count: fine, only not bit-exact
            say(f'resuming a {state["world"]}-process run with {self.world}: RNG states reseeded')
            seed_all(self.args['seed'] * 1000 + self.rank + 7919 * self.unit)
            if state['step']:  # stopped in the unit's evaluation: its training is done, its ranks' sums go to rank 0
                self.step = batches_per_rank(state['unit_size'], self.world, self.args['size_batch'])
                for mine in state['ranks'] if self.rank == 0 else ():
                    for part in ('sums', 'counts'):
                        for k, v in mine.get(part, {}).items():
                            self.local[part][k] = self.local[part].get(k, 0) + v
                    self.local['n_samples'] += mine.get('n_samples', 0)
                    self.local['n_skipped'] += mine.get('n_skipped', 0)
        else:
            raise SystemExit(f'resume: the run stopped inside a unit with {state["world"]} processes; resume it with '
                             f'the same number (this has {self.world}), or from a unit boundary')

    def trained_through(self, state):
        """A resume.pt saved after its unit's last batch (a stop in the evaluation), with that unit's sample count."""
        size = state.get('unit_size')
        return size is not None and state['step'] >= batches_per_rank(size, state['world'], self.args['size_batch'])

    def check_position(self, state):
        """A resume.pt's position is a unit index and a batch count: the units before it (and the one it is inside)
        must be those the run trained, and a unit stopped inside must hold as many samples, else the resumed run
        would skip or repeat some in silence (a training part added or removed, datasets reordered, a split edited).
        Units after it may change (size_epoch raised or lowered, a part added at the end)."""
        saved, units = state.get('units'), self.task.units()  # (absent from resume files of earlier versions)
        names = [u['name'] for u in units]
        if saved is not None:
            k = min(state['unit'] + 1, len(names), len(saved))
            i = next((i for i in range(k) if names[i] != saved[i]), None)
            if i is not None:
                raise SystemExit(f"resume: the run's units are not those of its resume.pt: unit {i + 1} was "
                                 f"'{saved[i]}', is now '{names[i]}' (a training part added or removed, or datasets "
                                 f"reordered?): resume with the run's data files and datasets")
        if state['step'] and state.get('unit_size') is not None and state['unit'] < len(units):
            size = self.task.unit_size(units[state['unit']])
            if size != state['unit_size']:
                raise SystemExit(f"resume: {names[state['unit']]} had {state['unit_size']} training samples when "
                                 f"resume.pt was saved inside it (step {state['step']}), it has {size} now: going on "
                                 f"there would skip or repeat samples; restore its data to resume")

    def save_unit(self, name):
        if is_main():
            save_torch(self.raw.state_dict(), os.path.join(self.out, name))  # plain state dict: the original loads it
            if self.args['save_safetensors']:
                save_safetensors(self.raw.state_dict(), os.path.join(self.out, name.removesuffix('.pt') + '.safetensors'))
            # log.json as the original's (its keys, in its order); what this project adds beside it
            keys, template = self.task.log_keys(), self.task.new_log()
            save_json(in_order_of({k: template[k] for k in keys}, self.log), os.path.join(self.out, 'log.json'))
            save_json({k: v for k, v in self.log.items() if k not in keys}, os.path.join(self.out, 'log_extra.json'))

    def fit(self, out=None):
        """Train the units from the current position, evaluate and checkpoint each. -> True when done, False when
        stopped early (resumable)."""
        self.out, self.steps_run = out or self.out, 0
        if is_main():
            # (a position at a unit's end is before its evaluation: an evaluation logged there is done again; one
            # inside a unit before its first optimiser step, its windows skipped, is after the previous unit's)
            units = self.task.units()
            at_end = self.step > 0 and self.unit < len(units) and self.trained_through(
                dict(step=self.step, world=self.world, unit_size=self.task.unit_size(units[self.unit])))
            self.steplog = StepLog(out, self.args['log_tb'], self.global_step, evaluated=not at_end)
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
            handlers = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        try:
            done = self.fit_units()
            if done and self.global_step and self.log['n_overflow'] >= self.global_step:  # (never 'done' unchanged)
                raise SystemExit(f'stopping: fp16\'s GradScaler skipped every one of the {self.global_step} optimiser '
                                 f'steps (inf/NaN gradients): the weights are those the run started from; try '
                                 f'precision bf16/fp32, a lower lr or max_grad_norm')
            return done
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.steplog:
                self.steplog.close()
                self.steplog = None

    def on_signal(self, signum, frame):
        """A scheduler's warning before it kills the job, or Ctrl-C: finish the step, save resume.pt, stop
        (train_unit). A second Ctrl-C, SECOND_CTRL_C seconds or more after the first, stops at once (torchrun passes
        the terminal's one on to its workers within milliseconds: that copy is not a second press)."""
        if signum == signal.SIGINT and self.signalled == signal.SIGINT:
            if time.monotonic() - self.ctrl_c_at >= SECOND_CTRL_C:
                raise KeyboardInterrupt
            return
        self.signalled, self.ctrl_c_at = signum, time.monotonic()

    def out_of_memory(self, e, where):
        """The one line for a training step that ran out of (GPU) memory: torch's first line, the settings that
        decide the memory, what to change. What resume.pt holds is whole (nothing was saved after the failure)."""
        a, first = self.args, (str(e).strip().splitlines() or ['out of memory'])[0]
        change = (['set grad_ckpt: true (the same batches in less memory)'] if not a['grad_ckpt'] else []) + [
            'lower size_batch (raising grad_accum keeps the samples per optimiser step; from a unit boundary, as '
            'size_batch cannot change inside one)']
        return (f'{where}: {first} (size_batch {a["size_batch"]} per process, precision {self.precision}, grad_ckpt '
                f'{str(a["grad_ckpt"]).lower()}): ' + ', or '.join(change))

    def stop_for_data(self, error, first_failed, where, saved='there'):
        """After a batch could not be loaded (a bad sample without skip_bad, an unreadable file, a dead worker) and
        resume.pt was saved (`saved` says where; None: --eval, no resume.pt): the rank that failed raises its error (a
        DataError becomes its one-line message), the others stop naming that rank. Nothing trained is lost."""
        # a bad sample is the usual cause; a DataLoader worker killed (the OOM killer) or a failed read is not the
        # data's; rank 0 does not know another rank's error, whose own message says which
        fix = ('fix the data (or set skip_bad: true)' if isinstance(error, dataset.DataError) else
               f"fix what rank {first_failed}'s message says (bad data: fix it or set skip_bad: true; a killed "
               f'DataLoader worker: memory? fewer num_workers)' if error is None else
               'fix what the message below says (a killed DataLoader worker: memory? fewer num_workers)')
        if saved:
            say(f'\n{where}: rank {first_failed} could not load its batch; resume.pt saved {saved}: {fix} and continue '
                f'with --resume {self.out}')
        self.raise_failed(error, first_failed, where)

    def too_many_skipped(self, n_skipped, n, where):
        return (too_many_skipped(n_skipped, n, where, self.args['max_skip_frac'], 'at least ') +
                f'; resume.pt saved at step {self.step}: --resume {self.out} goes on from there')

    def raise_failed(self, error, first_failed, where):
        """A batch could not be loaded: the rank that failed raises its error (a DataError becomes its one-line
        message; a dead DataLoader worker, torch's one line), the others stop naming that rank."""
        if isinstance(error, RuntimeError) and str(error).startswith('DataLoader worker'):
            raise SystemExit(f'stopped at {where}: {error}') from None
        if error is not None:
            raise error
        raise SystemExit(f'stopped at {where}: rank {first_failed} could not load its batch (its message says why)')

    def stopped_by(self, signum, where):
        return (f'stopped by {signal.Signals(signum).name} at {where}: resume.pt saved; continue with '
                f'--resume {self.out}')

    def fit_units(self):
        units = self.task.units()
        if self.unit >= len(units):  # a resumed run that had finished: say so rather than 'done'
            say(f'nothing to do: {self.out} has finished all {len(units)} units (the last: {units[-1]["name"]}); '
                f'--set size_epoch=N with a larger N trains on')
            return False
        if self.unit == 0 and self.step == 0:
            self.save_unit(self.task.ckpt_name(None))
        while self.unit < len(units):
            unit = units[self.unit]
            losses = self.train_unit(self.unit, unit)
            if losses is None:
                return False
            accs = {tag: self.evaluate(self.unit, tag, ds) for tag, ds in self.task.eval_sets(unit).items()}
            self.task.record(self.log, unit, losses, accs)
            if self.steplog:
                self.steplog.evaluation(self.global_step, unit['name'],
                                        {self.task.curve_tag(unit, t): a for t, a in accs.items()})
            self.save_unit(self.task.ckpt_name(unit))
            self.unit, self.step, self.local = self.unit + 1, 0, self.fresh_local()
            self.save_resume()
            signalled = int(all_reduce([self.signalled], dist.ReduceOp.MAX if self.world > 1 else None)[0])
            if signalled and self.unit < len(units):
                raise SystemExit(self.stopped_by(signalled, f'the end of {unit["name"]}'))
            speed = f'{self.speed:.1f} samples/s' if self.speed is not None else 'trained before the resume'
            say(f'{unit["name"]}: loss {fmt(losses)} | ' + ' | '.join(f'{t} {fmt(a)}' for t, a in accs.items()) +
                f' | {speed} | skipped {self.log["n_skipped"]} non-finite {self.log["n_nonfinite"]}'
                + (f' fp16-overflow {self.log["n_overflow"]}' if self.scaler.is_enabled() else '') +
                f' | waited for data {self.data_wait:.0%}')
            if self.data_wait > DATA_WAIT_WARN and not self.data_warned:
                self.data_warned = True
                say(f'data loading held up training {self.data_wait:.0%} of {unit["name"]}: raise num_workers '
                    f'(now {loader_workers(self.args)}; {usable_cpus()} CPUs here)')
            if self.unit < len(units) and self.stop_asked():
                self.say_stopped()
                return False
        return True

    def stop_asked(self):
        return bool(self.args['stop_after_steps']) and self.steps_run >= self.args['stop_after_steps']

    def say_stopped(self):
        say(f'stopped after {self.steps_run} steps (stop_after_steps); continue with --resume {self.out}')


# what schedulers send some time before they kill a job (Slurm: SIGTERM at preemption or the time limit, and
# --signal=USR1@SECONDS ahead of it; torchrun forwards SIGTERM to its workers), and Ctrl-C (SIGINT, to every
# process of the terminal's job; torchrun, whose ranks have sessions of their own, passes it on)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SECOND_CTRL_C = 1.0  # seconds: a Ctrl-C this long after the first stops at once


def outlive_stop_signals(trainer_pid, worker_id):
    """DataLoader worker_init_fn: a stop signal sent to every process of the job must not kill the workers before
    their trainer has finished its step and saved (it would die of 'DataLoader worker killed by signal' first),
    while the trainer's own SIGTERM (the DataLoader ending a worker) still ends it at once, as torch's handler does.
    Only the sender tells them apart: the signals are blocked here (and in every thread started from here on) and
    taken by a thread that reads who sent them."""
    if not hasattr(signal, 'sigwaitinfo'):  # (macOS: torch's default, the workers die with the job)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def take():
        while True:
            if signal.sigwaitinfo(STOP_SIGNALS).si_pid == trainer_pid:
                os._exit(0)
    threading.Thread(target=take, daemon=True, name='stop-signals').start()


DATA_WAIT_WARN = 0.1  # the first unit that waited longer than this share of its time for batches says so


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()  # (macOS: no affinity)


MAX_AUTO_WORKERS = 8  # on one H100 with 16 cores, 8 workers keep up with every full-size bf16 step (README, Benchmark)


def batches_per_rank(n, world, size_batch):
    """A training unit's batches on each rank: its DistributedSampler pads n samples to a multiple of world."""
    return math.ceil(math.ceil(n / world) / size_batch)


def eval_indices(n, size_batch, rank, world, blocks):
    """The items of a split of n that `rank` evaluates, in order, and how many batches every rank has.
    blocks: batches rank, rank + world, ... of the single process's batches of consecutive items, as the original's
    DataParallel split its batches (fine-tuning: retrieval's in-batch accuracy depends on which items share a
    batch); else every world-th item, as its DistributedSampler gave them (pretraining)."""
    if blocks:
        n_batch = math.ceil(n / size_batch)
        mine = [i for b in range(rank, n_batch, world) for i in range(b * size_batch, min((b + 1) * size_batch, n))]
        return mine, n_batch // world
    return list(range(rank, n, world)), math.ceil(n // world / size_batch)


def loader_workers(args):
    """The DataLoader worker count of num_workers: itself, or for -1 (auto) one per CPU of this process's share of
    the node but one (the training process's own), at most MAX_AUTO_WORKERS."""
    if args['num_workers'] >= 0:
        return args['num_workers']
    share = usable_cpus() // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def timed(batches, waited):
    """The batches of a loader, adding the seconds spent waiting for each to waited[0] (the first is not counted:
    it includes starting the workers). A batch that cannot be loaded ends them with its exception, yielded rather
    than raised, so that the trainer saves where it stands first."""
    it, first = iter(batches), True
    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler raises for a DataLoader worker that died (the OOM killer) wherever the main thread
        # is: under torchrun inside a step's collectives, leaving the other ranks there. Without it the loader finds
        # the dead worker at its next batch (within its 5 s status check), where it is yielded as any failed batch
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001  raised again by Trainer.stop_for_data, whatever it is
            # its traceback's frames and this one held the loader's iterator, whose workers (and the output folder's
            # lock they inherited) then outlived the run in a process that goes on
            it = None
            traceback.clear_frames(e.__traceback__)
            yield e
            return
        if not first:
            waited[0] += time.perf_counter() - t0
        first = False
        yield batch


def new_window():
    return dict(sums={}, counts={}, n=0, n_samples=0, t0=time.time())


def add_to(acc, values):
    """Loss values into acc's sums and counts, each key apart; NaN (a loss without a target in its batch) left out."""
    for k, v in values.items():
        if not math.isnan(v):
            acc['sums'][k] = acc['sums'].get(k, 0.0) + v
            acc['counts'][k] = acc['counts'].get(k, 0) + 1


def logged_before(line, step, evaluated):
    """Whether a steps.jsonl line was logged before the position a resumed run goes on from: a training step up to
    `step`, an evaluation at `step` only when that position comes after it (evaluated). Not a line a kill cut short."""
    try:
        rec = json.loads(line)
        return rec['step'] < step or rec['step'] == step and (evaluated or 'eval' not in rec)
    except (json.JSONDecodeError, KeyError, TypeError):
        return False


def train_scalars(rec):
    """The TensorBoard scalars of a training line of steps.jsonl."""
    return {'train/loss': rec['loss'], **{f'train/{k}': v for k, v in rec['losses'].items()}, 'train/lr': rec['lr'],
            'train/samples_per_s': rec['samples_per_s']}


class StepLog:
    """Rank 0's curves: steps.jsonl (one JSON line per optimiser step: rank 0's mean losses over the step's batches,
    lr and samples/s since the previous line; one line per unit's evaluation) and, under log_tb, the same scalars
    as TensorBoard events in <out>/tb. Appended: a resumed run goes on in the same files, from its position `step`
    (what a killed run logged after its last resume.pt is dropped: the resumed run does those steps again)."""

    def __init__(self, out, tb, step=0, evaluated=True):
        path, kept = os.path.join(out, 'steps.jsonl'), []
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                lines = f.readlines()
            kept = [ln for ln in lines if logged_before(ln, step, evaluated)]
            if len(kept) < len(lines):
                def write(tmp):
                    with open(tmp, 'w', encoding='utf-8') as f:
                        f.writelines(kept)
                dataset.write_atomic(path, write)
        self.file = open(path, 'a', encoding='utf-8')
        self.tb = None
        if tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f'log_tb: TensorBoard is not installed ({e}); pip install -r requirements.txt') from e
            # TensorBoard purges by step alone: from a unit's end before its evaluation, the step itself goes (an
            # evaluation the killed run logged there is done again) and its training scalars are written back
            self.tb = SummaryWriter(os.path.join(out, 'tb'), purge_step=(step + evaluated) if step else None)
            if step and not evaluated:
                for rec in map(json.loads, kept):  # (lines a kill cut short are not kept)
                    if rec['step'] == step and 'eval' not in rec:
                        self.add_scalars(train_scalars(rec), step)

    def write(self, rec, scalars):
        try:
            self.file.write(json.dumps(rec) + '\n')
            self.file.flush()
        except OSError as e:  # a full disk: stop here, as a failed checkpoint does (a cut line is dropped on resume)
            raise dataset.write_error(self.file.name, e.strerror or e) from e
        if self.tb:
            self.add_scalars(scalars, rec['step'])

    def add_scalars(self, scalars, step):
        try:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        except OSError as e:  # (tensorboard's writer thread raises a full disk's error again here: a traceback)
            raise dataset.write_error(os.path.join(os.path.dirname(self.file.name), 'tb'), e.strerror or e) from e

    def train(self, step, unit, unit_step, window, lr):
        n = window['n']
        speed = window['n_samples'] / max(time.time() - window['t0'], 1e-9)
        losses = {k: v / window['counts'][k] for k, v in window['sums'].items() if k != 'loss'}
        rec = dict(step=step, unit=unit, unit_step=unit_step, loss=window['sums']['loss'] / n, losses=losses, lr=lr,
                   samples_per_s=speed)
        self.write(rec, train_scalars(rec))

    def evaluation(self, step, unit, accs):
        metrics = {f'{tag}/{k}': v for tag, acc in accs.items() for k, v in acc.items()}
        self.write(dict(step=step, unit=unit, eval=metrics), {f'eval/{k}': v for k, v in metrics.items()})

    def close(self):
        with contextlib.suppress(OSError):  # a write that failed (full disk) was raised by write(), once
            self.file.close()
        if self.tb:
            with contextlib.suppress(OSError):
                self.tb.close()


def fmt(d):
    return ' '.join(f'{k} {v:.4f}' if v is not None else f'{k} -' for k, v in d.items())


def too_many_skipped(n_skipped, n, where, frac, bound=''):
    return (f'stopping: {bound}{n_skipped} of the {n} samples of {where} were bad and skipped, more than max_skip_frac '
            f'{frac} allows; run with skip_bad false to see the first error (or raise max_skip_frac)')


def evaluate_only(task, trainer, out):
    """--eval: the task's val and test metrics (pretraining: each dataset's val split) with the checkpoint's weights
    -> eval.json beside args.json. A pretraining checkpoint (it holds the MLM head) evaluated by a task whose head it fills is zero-shot: its VTM
    head scores the pairs (QA-MC: each question + option, the best option wins; retrieval: each caption)."""
    t0 = time.time()
    trainer.evaluating_only = True
    results = task.evaluate_only(trainer)
    zero_shot = any(k.startswith('fc_mtm.') for k in trainer.unused)
    if is_main():
        run = dict(ckpt=trainer.args['path_ckpt'], task=task.type, world=trainer.world, precision=trainer.precision,
                   zero_shot=zero_shot, head=('VTM head of the pretraining checkpoint' if zero_shot else 'pretraining heads'
                                                   if task.type == 'pretrain' else 'fine-tuned'),
                   n_skipped=trainer.log['n_skipped'], sec=time.time() - t0)
        save_json(dict(run=run, **results), os.path.join(out, 'eval.json'))
        for split, res in results.items():
            print(f'{split}: ' + ' '.join(f'{k} {v:.4f}' for k, v in res.items() if isinstance(v, float)), flush=True)
        print(f'wrote {out}/eval.json', flush=True)


@data_errors_in_one_line
def main(task_cls, default_config, argv=None):
    """The whole run of one script: config, process group, model, data, training, files."""
    cli = parse_cli(default_config, argv)
    # the process group first: a check below that fails on one node alone (a file its disk lacks) stops
    # every rank with its message, rather than leaving the others waiting for it in a collective
    rank, world, device = init_dist(cli.local_rank)
    state, args = agreed(prepare, cli, task_cls)
    if state is not None:
        agreed(same_resume_state, state)
    if device.type == 'cpu':  # a CPU kernel that accumulates over repeated indices may do so in a racy order:
        torch.use_deterministic_algorithms(True, warn_only=True)  # exact resume needs the deterministic ones
    task = agreed(task_cls, args)
    agreed(task.check_eval_data if cli.eval else task.check_data)  # every file and split it reads, before a step
    out = args['path_output'] or default_output(task.name + ('_eval' if cli.eval else ''))
    made = not os.path.exists(out)
    lock, out = take_on_main(lambda: take_folder(out, bool(cli.resume), cli.overwrite, task.run_files()), world, out)
    args['path_output'] = out
    failed = True
    try:
        out = run(cli, task, state, device, out)
        failed = False
        return out
    except KeyboardInterrupt:  # (a second Ctrl-C, or one outside training): one line, not a traceback
        saved = not cli.eval and os.path.isfile(os.path.join(out, 'resume.pt'))
        raise SystemExit('interrupted (Ctrl-C): ' + (f'the steps since its last resume.pt are lost; --resume {out} '
                                                     f'goes on from there' if saved else 'nothing saved to go on from'))
    except dataset.WriteError as e:  # a full disk: what is on it is whole (write_atomic); say how to go on
        if not os.path.isdir(out):
            raise SystemExit(f'{e}: the run\'s folder {out} is gone (removed while the run wrote to it?), and with it '
                             f'its checkpoints and resume.pt: start it again') from e
        resumable = not cli.eval and os.path.isfile(os.path.join(out, 'resume.pt'))
        raise SystemExit(f'{e}; the files written before are whole: make room and ' +
                         (f'continue with --resume {out} (from its last resume.pt)' if resumable else
                          'start it again (--overwrite replaces the files of this run)')) from e
    finally:
        if lock:
            lock.close()  # releases the folder (a killed process releases it too)
            # a run that failed before its first file, or an --eval that failed (its args.json would block the rerun),
            # leaves no folder it made
            if made and os.path.isdir(out) and (os.listdir(out) == ['.lock'] or cli.eval and failed):
                shutil.rmtree(out)


DERIVED_KEYS = ('size_vocab', 'size_frame')  # 0: derived from the data, the count recorded in args.json


def prepare(cli, task_cls):
    """The run's args (and resume state, else None) from the command line: --resume's checks, the config's.
    -> (state, args)."""
    state = None
    if cli.resume:
        path = os.path.join(cli.resume, 'resume.pt') if os.path.isdir(cli.resume) else cli.resume
        if not os.path.isfile(path):
            began = os.path.isfile(os.path.join(os.path.dirname(path), 'args.json'))
            raise SystemExit(f'resume: no resume state at {path}' + (
                ' (with several nodes the run folder must be on a disk they all see)' if get_world() > 1 else '') + (
                ' (the run stopped before its first one: save_minutes / save_every, or the end of its first unit): '
                'start it again with its command line and --overwrite' if began else ''))
        try:
            state = violet.read_checkpoint(path)
        except violet.CheckpointError as e:
            raise SystemExit(f'resume: {e}') from e
        if not isinstance(state, dict) or not {'args', 'model', 'optim', 'step'} <= set(state):
            raise SystemExit(f'resume: {path} holds weights alone, not a resume state (resume.pt): to train from them, '
                             f'start a run with --set path_ckpt={path}')
        damaged = resume_problem(state)
        if damaged:  # (each was a KeyError or TypeError traceback from deep in the trainer)
            raise SystemExit(f'resume: {path}: {damaged}: not a whole resume.pt of this version; resume from another '
                             f'copy, or start the run again')
        # stop_after_steps belongs to the invocation that sets it: a resumed run goes on to the end unless --set asks again
        args = load_args(sets=cli.set, base={**state['args'], 'stop_after_steps': 0})
        for k in DERIVED_KEYS:  # 0 (derived from the data) means what the run derived and recorded
            if args.get(k) == 0 and state['args'].get(k):
                args[k] = state['args'][k]
        if cli.config_given:  # the resumed run keeps its args.json (and --set): a config file is not applied
            try:
                given = with_home(config.read_file(cli.config))
            except config.FileError as e:
                raise config_error(str(e)) from None
            overridden = {kv.partition('=')[0] for kv in cli.set} | {'path_output', 'stop_after_steps'}
            differ = [k for k, v in given.items() if k not in overridden and args.get(k, v) != v
                      and not (k in DERIVED_KEYS and v == 0)]
            if differ:
                raise SystemExit(f"resume: {cli.config} differs from the run's args in {', '.join(differ)}: a resumed "
                                 f"run keeps its args.json; change a key with --set KEY=VALUE, without the config file")
        args['path_output'] = os.path.dirname(os.path.abspath(path))
        changed = [f"{k} {state['args'][k]} -> {args[k]}" for k in ('size_batch', 'grad_accum', 'seed')
                   if state['step'] and state['args'][k] != args[k]]
        if changed:  # the position is a batch count: with other batches (the seed orders them) it would point elsewhere
            raise SystemExit(f"resume: the run stopped inside a unit (step {state['step']}); {', '.join(changed)} "
                             f"would skip or repeat samples: resume with the run's values, or from a unit boundary")
        changed = [f"{k} {state['args'][k]} -> {args[k]}" for k in MODEL_SHAPE_KEYS
                   if k in state['args'] and state['args'][k] != args[k]]
        if changed:
            raise SystemExit(f"resume: {', '.join(changed)} would build another model than the run's weights: "
                             f"resume with the run's values (a new model is a new run: --set path_ckpt=CKPT)")
        state['args'] = args
    else:
        args = load_args(cli.config, cli.set)
        given = set(config.read_file(cli.config) if cli.config else ()) | {kv.partition('=')[0] for kv in cli.set}
        unread = sorted(k for k in given if task_cls.type not in KEY_TASKS.get(k, (task_cls.type,)))
        if unread:
            say(f"note: {task_cls.type} does not read {', '.join(unread)} (keys of " +
                ', '.join(sorted({t for k in unread for t in KEY_TASKS[k]})) + ')')
    if cli.eval and (cli.resume or not args['path_ckpt']):
        raise SystemExit('--eval evaluates the weights of a checkpoint: --set path_ckpt=FILE (not --resume)')
    if not cli.eval and args['lr'] == 0:  # (it trained to 'done' with the weights it started from)
        raise config_error("key 'lr' is 0: training would not change the weights (to evaluate a checkpoint as it is: "
                           "--eval --set path_ckpt=FILE)")
    if args['type'] not in ('', task_cls.type):
        raise config_error(f"key 'type' is '{args['type']}', but this script trains '{task_cls.type}'")
    args['type'] = task_cls.type
    return state, args


def resume_problem(state):
    """What keeps a resume.pt's dict from being one Trainer.load_state reads ('' when nothing)."""
    kinds = dict(args=dict, model=dict, optim=dict, log=dict, unit=int, step=int, nonfinite_run=int, ranks=list,
                 world=int)
    for k, kind in kinds.items():
        if not isinstance(state.get(k), kind):
            return f'"{k}" is ' + ('missing' if k not in state else f'a {type(state[k]).__name__}, not a {kind.__name__}')
    if not isinstance(state.get('scaler', 0), dict) or not {'state', 'param_groups'} <= set(state['optim']):
        return 'its optimiser or grad scaler state is missing'
    if not {'n_nonfinite', 'n_skipped'} <= set(state['log']) or len(state['ranks']) != state['world']:
        return 'its log or its ranks\' states are incomplete'
    return ''


def agreed(fn, *a):
    """fn(*a) on every rank, and the ranks' verdicts agreed: when it stops one (SystemExit, bad data, a missing
    file), every rank stops with that message (the first such rank's, naming it and its host when it is not rank 0),
    so none is left waiting in a collective for a rank that left (for torch's 30 minutes). -> fn's result."""
    try:
        result, error = fn(*a), None
    except BaseException as e:  # (any: a rank that left without its verdict would leave the others waiting)
        if get_world() == 1:
            raise
        result, error = e, error_line(e)
    if get_world() > 1:
        verdicts = gather_objects((socket.gethostname(), error))
        first = next((r for r, (_, e) in enumerate(verdicts) if e is not None), None)
        if first is not None:
            host, error = verdicts[first]
            leave_group()  # every rank is here: the group ends cleanly (gloo's threads at exit could abort it)
            if isinstance(result, BaseException):
                raise result  # a failing rank: its own error
            raise SystemExit(error if first == 0 else f'rank {first} (on {host}): {error}')
    return result


def error_line(e):
    """The one line a script stops with for e."""
    if isinstance(e, SystemExit):
        return str(e)
    if isinstance(e, (dataset.DataError, FileNotFoundError)):
        return dataset.error_message(e)
    if isinstance(e, dataset.WriteError):
        return str(e)
    if isinstance(e, violet.CheckpointError):
        return str(e) if str(e).startswith(('path_vt: ', 'resume: ')) else f'path_ckpt: {e}'
    return f'{type(e).__name__}: {e}'



def same_resume_state(state):
    """Every rank resumes from the same resume.pt: a node that reads its own copy (the run folder on a disk of each
    node, not one they share) would go on from another position, or hang. Collective."""
    mine = (state.get('saved_as'), state['unit'], state['step'], state.get('global_step'))
    first = gather_objects(mine)[0]
    if mine != first:
        raise SystemExit(f"resume: this rank read another resume.pt than rank 0 (unit {mine[1]} step {mine[2]}, rank "
                         f"0's unit {first[1]} step {first[2]}): with several nodes the run folder must be one they "
                         f"all see (a shared disk), not a copy on each")


def take_on_main(take, world, out):
    """take() on rank 0 alone (it creates and locks the output folder `out`), its verdict agreed: a refusal stops
    every rank. -> (take()'s result on rank 0, else None; rank 0's `out`, whose default name is random)."""
    result = agreed(lambda: take() if is_main() else None)
    if world > 1:
        box = [out]
        dist.broadcast_object_list(box)  # rank 0's folder name
        out = box[0]
    return result, out


def default_output(name):
    """_snapshot/_<name>_<time>_<random>: two runs started in the same second get different folders."""
    return os.path.join('_snapshot', f'_{name}_{time.strftime("%Y%m%d%H%M%S")}_{secrets.token_hex(3)}')


# keys that only some tasks read (the others say so when given one)
KEY_TASKS = {'retrieval_loss': ('retrieval',), 'size_option': ('qamc',), 'size_vocab': ('qaoe',),
             'datasets': ('pretrain',), **dict.fromkeys(('dataset', 'task', 'size_frame', 'frame_layout'),
                                                         ('qamc', 'qaoe', 'retrieval'))}
# keys whose change gives the model other parameter shapes (a resumed run's weights would not load)
MODEL_SHAPE_KEYS = ('txt_backbone', 'vt_dim', 'vt_depths', 'vt_heads', 'vt_window', 'mvm_target', 'size_vocab')
def in_order_of(template, log):
    """log's entries under template's keys, in template's order, at every level (a log restored from an older
    resume.pt keeps the order it was built in)."""
    return {k: in_order_of(v, log[k]) if isinstance(v, dict) else log[k] for k, v in template.items()}


def read_run_log(out):
    """A run's log: its log.json (the original's keys) with log_extra.json's entries beside them (the counts of
    samples and steps skipped, the model keys not loaded from path_ckpt; QA-OE's ac_iv)."""
    extra = os.path.join(out, 'log_extra.json')
    return {**dataset.load_json(os.path.join(out, 'log.json')),
            **(dataset.load_json(extra) if os.path.isfile(extra) else {})}


RUN_FILES = ('args.json', 'log.json', 'log_extra.json', 'resume.pt', 'eval.json', 'eval_retrieval.json', 'steps.jsonl',
             'tb')


def take_folder(out, resume, overwrite, own_files=()):
    """Create the output folder and lock it for this process (flock on out/.lock, held until the process ends or
    the returned file is closed). A folder in use by another run is refused; so is one that holds another
    run's files, unless this run resumes it or --overwrite removes them. Stale tmp files are removed."""
    lock = lock_folder(out)
    old = sorted(f for f in os.listdir(out) if f in RUN_FILES or f in own_files or f.startswith('ckpt_violet_'))
    if old and not resume:
        if not overwrite:
            lock.close()
            raise SystemExit(f"{out} holds another run's files ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''}): "
                             f'continue that run with --resume {out}, choose another path_output, or pass --overwrite '
                             f'to replace them')
        for f in old:
            (shutil.rmtree if os.path.isdir(os.path.join(out, f)) else os.remove)(os.path.join(out, f))
        print(f'--overwrite: removed {len(old)} file(s) of the previous run in {out}', flush=True)
    for name, obj in dict(own_files).items() if resume else ():  # (QA-OE's vocab.json: the classes' meaning)
        path = os.path.join(out, name)
        was = dataset.load_json(path) if os.path.isfile(path) else obj
        if was != obj:
            lock.close()
            i = next((i for i, (a, b) in enumerate(zip(was, obj)) if a != b), None) if isinstance(obj, list) else None
            what = (f'entry {i} was {was[i]!r}, is now {obj[i]!r}' if i is not None else
                    f'{len(was)} entries, now {len(obj)}' if isinstance(obj, list) and isinstance(was, list) else 'changed')
            raise SystemExit(f"resume: {path} differs from what the run's data gives now ({what}): the weights were "
                             f"trained with it; resume with the run's data files (path_data)")
    dataset.remove_stale_tmp(out)
    return lock


def lock_folder(out, what='path_output'):
    """Create the folder and lock it for this process (flock on out/.lock, held until the process ends or the
    returned file is closed); a folder locked by another process is refused, naming it."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, '.lock'), 'a+', encoding='utf-8')
    except OSError as e:  # not a folder one may write in (permission, a read-only disk, a file of that name)
        raise SystemExit(f'{what}: cannot write in {out}: {e.strerror or e}') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise SystemExit(f'{out} is in use by another run ({holder or "its lock is held"}); wait for it to end or '
                         f'choose another {what}') from None
    except OSError as e:  # a file system without locks (Lustre mounted noflock, NFS without lockd): go on, said
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        say(f'{what}: {out} cannot be locked ({e.strerror}): nothing stops another run from writing in it too')
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        lock.flush()
    except OSError as e:  # a full disk: no folder holding a .lock alone is left behind
        with contextlib.suppress(OSError):  # (close flushes again, and closes the file even when that fails)
            lock.close()
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f'{what}: cannot write in {out}: {e.strerror or e}') from None
    return lock


def run(cli, task, state, device, out):
    args, world = task.args, get_world()
    if is_main():
        print(f'{task.name}: {world} process(es) on {device}, {loader_workers(args)} DataLoader workers each, '
              f'output {out}', flush=True)
    try:
        trainer = Trainer(task, device, state, need='all' if cli.eval else None)
    except violet.CheckpointError as e:
        raise SystemExit(error_line(e)) from e
    # a resumed run that had finished keeps its files: its --set changes would describe training never done
    finished = state is not None and not cli.eval and trainer.unit >= len(task.units())
    if is_main():
        if not finished:
            save_json(args, os.path.join(out, 'args.json'))  # after the task filled in what it derives (size_vocab)
            for name, obj in task.run_files().items():
                save_json(obj, os.path.join(out, name))
        if cli.eval:
            print(f'evaluation only, precision {trainer.precision}, weights {args["path_ckpt"]}', flush=True)
        elif state is None:
            print(f'precision {trainer.precision}; not loaded from {args["path_ckpt"] or "(no checkpoint)"}: '
                  f'{trainer.not_loaded}', flush=True)
    if cli.eval:
        evaluate_only(task, trainer, out)
    elif trainer.fit(out):
        say(f'done: {out}')
    leave_group()
    return out
