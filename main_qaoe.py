"""VIOLET fine-tuning for open-ended video QA (docs/violet.md#losses): cross-entropy over size_vocab answer classes
on the fused CLS.

A question whose answer is not in the answer vocabulary has "answer": -1 in txt_<task>.json. Training gives it
no loss (never an error); evaluation counts it as wrong. `ac` is the accuracy over ALL questions (the main
number, VIOLETv2's protocol: dropping such questions inflates it), `ac_iv` the accuracy over the in-vocabulary
questions only. The run writes vocab.json (the answer texts, by class index) beside its checkpoints; predict.py
reads it to answer in words. A txt_<task>.json without "vocab" trains on the answer indices of size_vocab classes,
as the original (no vocab.json then).

    python main_qaoe.py [_data/args_msvd-qa.json] [--set KEY=VALUE ...] [--resume DIR]
    python main_qaoe.py CONFIG --eval --set path_ckpt=CKPT      (val and test accuracy, no training)
    torchrun --nproc_per_node=N main_qaoe.py ...      (size_batch is per process)
"""
import agent
import dataset
import model as violet
import tasks


class QAOE(tasks.Downstream):
    type = 'qaoe'
    Model, Dataset = violet.VIOLET_QAOE, dataset.Dataset_QAOE
    metrics = ('ac', 'ac_iv')

    def step(self, model, batch, gen):
        img, txt, mask, ans = batch
        loss, (hits, n_in_vocab) = tasks.ce_hits(model(img, txt, mask), ans, model.training)  # -1: no loss, no hit
        # a batch without an answer in the vocabulary trains nothing: its logged loss is NaN, left out of the mean (not 0)
        return loss, {'tr': tasks.or_nan(loss, n_in_vocab)}, {'ac': (hits, ans.numel()), 'ac_iv': (hits, n_in_vocab)}

    def run_files(self):
        answers = self.split('train').answers
        if answers is None:
            return {}
        # classes past the answer list (a size_vocab over it, as the original allowed) are never a target: null
        return {'vocab.json': answers[:self.args['size_vocab']] + [None] * (self.args['size_vocab'] - len(answers))}

    def check_data(self):
        super().check_data()
        train = self.split('train')
        if train.answers is None:
            agent.say(f'{train.path_txt} has no "vocab": training on the answer indices of size_vocab '
                      f'{self.args["size_vocab"]} classes; no vocab.json is written (predict.py then needs --vocab, '
                      f'a JSON list of the answer texts by class index)')
        elif self.args['size_vocab'] > len(train.answers):
            agent.say(f"size_vocab {self.args['size_vocab']}: {train.path_txt} names {len(train.answers)} answers in its "
                      f'"vocab", so classes {len(train.answers)}..{self.args["size_vocab"] - 1} are never a target (as '
                      f'in the original); vocab.json lists them as null (--set size_vocab=0: as many as it names)')

    def build_model(self):
        if self.args['size_vocab'] == 0:  # 0: the train split counts the json's "vocab"; args.json records it
            self.args['size_vocab'] = self.split('train').size_vocab
        return super().build_model()


if __name__ == '__main__':
    agent.main(QAOE, './_data/args_msvd-qa.json')
