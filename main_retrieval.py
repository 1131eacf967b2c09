"""VIOLET fine-tuning for text-to-video retrieval (violet-spec 3.3): all B x B (video, text) pairs of a batch,
score / 0.05, cross-entropy with target i for video i. "Accuracy" = argmax of the row is its own text; the
real retrieval metrics come from eval_retrieval.py.

    python main_retrieval.py [_data/args_msrvtt-retrieval.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_retrieval.py ...      (size_batch is per process; negatives are in-process)
"""
import agent
import dataset
import model as violet


class Retrieval(agent.Downstream):
    type = 'retrieval'
    Model, Dataset = violet.VIOLET_Retrieval, dataset.Dataset_Retrieval

    def step(self, model, batch, gen):
        img, txt, mask = batch
        out, ans = model(img, txt, mask)
        loss, hits = agent.ce_hits(out, ans)
        return loss, {'tr': loss}, {'ac': hits}


if __name__ == '__main__':
    agent.main(Retrieval, './_data/args_msrvtt-retrieval.json')
