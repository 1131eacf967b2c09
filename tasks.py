"""What differs between main_pretrain.py, main_qamc.py, main_qaoe.py and main_retrieval.py: a Task says what to
build, train on, evaluate and log; agent.Trainer runs it. Downstream is the fine-tuning tasks' common part;
ce_hits their loss and accuracy.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import agent
import dataset


def ce_hits(out, ans, whole_batch=False):
    """Cross-entropy over the targets != -1 (0 when there are none, so a batch with nothing masked is no NaN)
    and argmax hits. -> (loss, (n_correct, n_targets)).
    whole_batch (fine-tuning, in training, under DDP): the mean over the targets of every rank's batch, as the
    original's one loss over its DataParallel batch. DDP averages the ranks' gradients, so this rank's share is its
    sum x world / the count over the ranks; a mean per rank weighed a rank's targets by how few it had (a rank whose
    QA-OE answers were all -1 added a loss of 0 and halved the others' gradient). Every rank must call it then."""
    out, ans = out.flatten(0, -2).float(), ans.flatten()
    keep = ans != -1
    n = keep.sum()
    total, world = F.cross_entropy(out, ans, ignore_index=-1, reduction='sum'), agent.get_world()
    hits = (((out.argmax(-1) == ans) & keep).sum(), n)
    if whole_batch and world > 1:
        n_all = n.clone()
        dist.all_reduce(n_all)
        return total * world / n_all.clamp(min=1), hits
    return total / n.clamp(min=1), hits


def or_nan(loss, n):
    """The loss to log: NaN when its batch had none of its n targets (the trainer leaves it out of the mean)."""
    return torch.where(n > 0, loss.detach(), math.nan)


class Task:
    """What one script defines; Trainer calls:
      build_model() -> nn.Module built from self.args
      units() -> list of dicts with 'epoch' (1-based) and 'name': each is train -> evaluate -> checkpoint, in order
      train_set(unit) -> Dataset;  eval_sets(unit) -> {tag: Dataset} evaluated after the unit
      step(model, batch, gen) -> (loss to minimise, {name: loss tensor} to log, {metric: (n_correct, n_count)});
          batch is on the device, gen a torch.Generator seeded from (seed, unit, step, rank)
      new_log() -> dict;  record(log, unit, mean losses, {tag: {metric: accuracy}}) appends to it
      log_keys() -> the keys of new_log() that the original's log.json has, in its order (the rest, with the run's
          counts, go to log_extra.json)
      ckpt_name(unit) -> file name (unit None: the checkpoint written before training)
      evaluate_only(trainer) -> {split: metrics} (--eval: no training)
      run_files() -> {file name: JSON object} written into the run dir beside the checkpoints (QA-OE: vocab.json)
      curve_tag(unit, tag) -> the evaluation's name in steps.jsonl and TensorBoard (pretraining: with the dataset)
    type: the config 'type' it trains; losses, metrics: the keys of step()'s losses and hits; name: of the output dir."""
    type = ''
    metrics = ()
    losses = ()
    unused_parameters = False  # True for a task whose loss leaves some parameters out (DDP must then look for them)
    eval_blocks = False  # evaluation under torchrun: batches of every world-th item (agent.eval_indices)

    def __init__(self, args):
        self.args = args

    @property
    def name(self):
        return self.type

    def evaluate_only(self, trainer):
        raise SystemExit(f'{self.type} has no evaluation-only mode')

    def check_data(self):
        """Open every dataset the run will read (a missing file or split stops it before the first step)."""
        for unit in self.units():
            self.train_set(unit)
            self.eval_sets(unit)

    def check_eval_data(self):
        """--eval: open every dataset evaluate_only reads, before the first is scored."""

    def unit_size(self, unit):
        """The number of training samples of a unit (resume.pt keeps it)."""
        return len(self.train_set(unit))

    def run_files(self):
        return {}

    def curve_tag(self, unit, tag):
        return tag

    def log_keys(self):
        return ('ls_tr', 'ac_vl', 'ac_ts')  # the original's fine-tuning log.json


class Downstream(Task):
    """Fine-tuning (docs/violet.md#losses): epochs of train -> val and test accuracy -> ckpt_violet_<task>_<epoch>.pt."""
    Model = Dataset = None
    losses, metrics = ('tr',), ('ac',)
    eval_blocks = True  # the single process's batches, as the original's DataParallel made them

    def __init__(self, args):
        super().__init__(args)
        if not args['task'] or not args['dataset']:
            raise agent.config_error(f"{self.type} needs the keys 'task' and 'dataset'")
        self.sets = {}

    @property
    def name(self):
        return self.args['task']

    def check_data(self):
        """Also every item's video, texts and answer: a video missing from the test split used to stop the run after
        a whole epoch of training; an empty caption, question or option and an answer out of range are named here too
        (under skip_bad such items are skipped and counted as they come)."""
        super().check_data()
        self.check_items(self.sets.values())
        train = self.split('train')
        if train.answer_range and all(isinstance(it, dict) and it.get('answer') == -1 for it in train.txt):
            raise dataset.DataError(f'{train.path_txt}["train"]: every answer is -1 ({train.no_answer[0]}): nothing to '
                                    f'learn from; an answer is {train.no_answer[1]}')  # (it trained nothing to 'done')

    def check_eval_data(self):
        """(a video missing from test stopped --eval after val was scored, and its args.json blocked the rerun)"""
        self.check_items([self.split(s) for s in ('val', 'test')])

    def check_items(self, sets):
        for ds in sets:  # an empty val or test split stopped the run at its first evaluation
            if not len(ds):
                raise dataset.DataError(f'{ds.path_txt}: "{ds.split}" has no items (every split the run trains on or '
                                        f'evaluates needs some)')
        if not self.args['skip_bad']:
            for ds in sets:
                ds.check_items()

    def build_model(self):
        self.record_frame_count()
        return self.Model(self.args)

    def record_frame_count(self):
        """size_frame 0: each split counts its videos' frames (dataset.Dataset_Downstream.frame_counts); the count
        the splits built so far agree on goes into args, so args.json records it (a resumed run, --eval and
        predict.py then use it)."""
        counts = {ds.size_frame for ds in self.sets.values()}
        if not self.args['size_frame'] and len(counts) == 1:
            self.args['size_frame'] = counts.pop()

    def split(self, split):
        if split not in self.sets:
            self.sets[split] = self.Dataset(self.args, split)
        return self.sets[split]

    def units(self):
        return [dict(epoch=e, name=f'epoch {e}') for e in range(1, self.args['size_epoch'] + 1)]

    def train_set(self, unit):
        ds = self.split('train')
        ds.draw_seed = agent.seed_of(self.args['seed'], unit['epoch'])  # its items' draws (exact resume, any workers)
        return ds

    def eval_sets(self, unit):
        return {'vl': self.split('val'), 'ts': self.split('test')}

    def step(self, model, batch, gen):  # (QA-MC; answer -1: no loss, and wrong, over all questions, as the original)
        img, txt, mask, ans = batch
        loss, (hits, n) = ce_hits(model(img, txt, mask), ans, whole_batch=model.training)
        return loss, {'tr': or_nan(loss, n)}, {'ac': (hits, ans.numel())}

    def new_log(self):
        return {'ls_tr': [], **{f'{m}_{t}': [] for m in self.metrics for t in ('vl', 'ts')}}

    def record(self, log, unit, losses, accs):
        log['ls_tr'].append(losses['tr'])
        for m in self.metrics:
            for t in ('vl', 'ts'):
                log[f'{m}_{t}'].append(accs[t][m])

    def evaluate_only(self, trainer):
        return {split: trainer.evaluate(0, split, self.split(split)) for split in ('val', 'test')}

    def ckpt_name(self, unit):
        return f'ckpt_violet_{self.args["task"]}_{unit["epoch"] if unit else 0}.pt'
