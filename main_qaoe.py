"""VIOLET fine-tuning for open-ended video QA (docs/violet.md#losses): cross-entropy over size_vocab answer classes
on the fused CLS.

    python main_qaoe.py [_data/args_msvd-qa.json] [--set KEY=VALUE ...] [--resume DIR]
    torchrun --nproc_per_node=N main_qaoe.py ...      (size_batch is per process)
"""
import agent
import dataset
import model as violet


class QAOE(agent.Downstream):
    type = 'qaoe'
    Model, Dataset = violet.VIOLET_QAOE, dataset.Dataset_QAOE

    def build_model(self):
        if self.args['size_vocab'] == 0:  # 0: as many classes as the json's "vocab" lists
            self.args['size_vocab'] = len(self.split('train').vocab)
        return super().build_model()


if __name__ == '__main__':
    agent.main(QAOE, './_data/args_msvd-qa.json')
