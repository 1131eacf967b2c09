"""VIOLET fine-tuning for text-to-video retrieval (docs/violet.md#losses): all B x B (video, text) pairs of a batch,
score / 0.05, cross-entropy with target i for video i. "Accuracy" = argmax of the row is its own text; the
real retrieval metrics come from eval_retrieval.py. retrieval_loss='both' adds the text-to-video direction
(each text's softmax over the batch's videos): the original's loss never compares one text's scores across
videos, which is what evaluation ranks; on the toy corpus a model trained from scratch learnt a per-video score
offset under it (text-to-video R@1 0.03 vs video-to-text 0.15 on the same scores).

    python main_retrieval.py [_data/args_msrvtt-retrieval.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_retrieval.py ...      (size_batch is per process; negatives are in-process)
    python main_retrieval.py CONFIG --eval --set path_ckpt=CKPT   (eval_retrieval's ranking of val and test:
        text-to-video and video-to-text R@1/5/10, median and mean rank; a pretraining checkpoint = zero-shot)
"""
import agent
import eval_retrieval
import dataset
import model as violet
import tasks


class Retrieval(tasks.Downstream):
    type = 'retrieval'
    Model, Dataset = violet.VIOLET_Retrieval, dataset.Dataset_Retrieval

    def __init__(self, args):
        super().__init__(args)
        if args['size_batch'] < 2:  # a video's softmax over one text is 0 and its argmax a hit: nothing learnt or measured
            raise agent.config_error(f"key 'size_batch' is {args['size_batch']}, but retrieval trains and measures "
                                     f"each video against the other texts of its batch: at least 2")

    def step(self, model, batch, gen):
        img, txt, mask = batch
        out, ans = model(img, txt, mask)
        loss, hits = tasks.ce_hits(out, ans, model.training)
        if self.args['retrieval_loss'] == 'both':
            loss = (loss + tasks.ce_hits(out.t(), ans, model.training)[0]) / 2
        return loss, {'tr': loss}, {'ac': hits}

    def evaluate_only(self, trainer):  # the real retrieval metrics, not the in-batch accuracy of training
        size_pair = 512 if trainer.device.type == 'cuda' else 64
        return {split: eval_retrieval.evaluate(trainer.raw, self.args, split, trainer.device, trainer.rank,
                                               trainer.world, size_pair) for split in ('val', 'test')}


if __name__ == '__main__':
    agent.main(Retrieval, './_data/args_msrvtt-retrieval.json')
