"""VIOLET fine-tuning for multiple-choice video QA (docs/violet.md#losses): a score per (video, question + option),
cross-entropy over the options.

    python main_qamc.py [_data/args_tgif-action.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_qamc.py ...      (size_batch is per process)
    python main_qamc.py CONFIG --eval --set path_ckpt=CKPT      (val and test accuracy, no training)

Zero-shot: `--eval` with a pretraining checkpoint scores every (video, question + option) with its VTM head (the
QA-MC head has the VTM head's shape and takes its weights) and picks the best option; eval.json says zero_shot.
"""
import agent
import dataset
import model as violet
import tasks


class QAMC(tasks.Downstream):
    type = 'qamc'
    Model, Dataset = violet.VIOLET_QAMC, dataset.Dataset_QAMC  # step: CE of the [B, O] scores vs the answer


if __name__ == '__main__':
    agent.main(QAMC, './_data/args_tgif-action.json')
