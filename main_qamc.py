"""VIOLET fine-tuning for multiple-choice video QA (docs/violet.md#losses): a score per (video, question + option),
cross-entropy over the options.

    python main_qamc.py [_data/args_tgif-action.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_qamc.py ...      (size_batch is per process)
"""
import agent
import dataset
import model as violet


class QAMC(agent.Downstream):
    type = 'qamc'
    Model, Dataset = violet.VIOLET_QAMC, dataset.Dataset_QAMC  # step: CE of the [B, O] scores vs the answer


if __name__ == '__main__':
    agent.main(QAMC, './_data/args_tgif-action.json')
