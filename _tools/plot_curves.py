"""Training curves of runs from their steps.jsonl (written by every run beside log.json): the training loss of
each optimiser step, and each evaluation metric after each unit, one panel per run.

    python _tools/plot_curves.py RUN_DIR [RUN_DIR ...] --out curves.png

A resumed run may have logged the steps after its last resume.pt twice: the later line of a step wins.
"""
import argparse
import json
import os


def read_steps(path):
    """-> (training lines, evaluation lines), one per step (the last written wins); a last line cut short by a
    kill is left out, any other unreadable line is an error naming it."""
    with open(path, encoding='utf-8', errors='replace') as f:  # (a damaged byte makes its line unreadable, named)
        lines = f.read().splitlines()
    train, evals = {}, {}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise SystemExit(f'{path} line {n}: not JSON ({e})') from e
        if not (isinstance(rec, dict) and isinstance(rec.get('step'), int) and
                (isinstance(rec.get('eval'), dict) if 'eval' in rec else isinstance(rec.get('loss'), (int, float)))):
            raise SystemExit(f'{path} line {n}: not a step line (a "step" with a "loss", or with an "eval" object)')
        (evals if 'eval' in rec else train)[rec['step']] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='run output folders (each holds steps.jsonl)')
    p.add_argument('--out', default='curves.png', help='image to write (.png, .svg, .pdf)')
    opt = p.parse_args()
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(opt.runs), figsize=(3.6 * len(opt.runs), 2.8), squeeze=False)
    kinds = fig.canvas.get_supported_filetypes()
    kind = os.path.splitext(opt.out)[1][1:].lower()
    if kind not in kinds:  # (matplotlib said so only after reading every run and drawing)
        raise SystemExit(f'--out {opt.out}: an image file is one of .{", .".join(sorted(kinds))}')
    for ax, run in zip(axes[0], opt.runs):
        path = os.path.join(run, 'steps.jsonl')
        if not os.path.isfile(path):
            raise SystemExit(f'{path}: no such file (runs write it beside log.json)')
        train, evals = read_steps(path)
        if not train and not evals:  # (an empty panel was drawn, and 'wrote' said)
            raise SystemExit(f'{path}: no step logged yet (the run stopped before its first optimiser step?)')
        ax.plot([r['step'] for r in train], [r['loss'] for r in train], lw=0.8, color='tab:blue')
        ax.set_title(os.path.basename(os.path.normpath(run)), fontsize=9)
        ax.set_xlabel('step', fontsize=8)
        ax.set_ylabel('training loss', fontsize=8, color='tab:blue')
        ax.tick_params(labelsize=7)
        if evals:
            acc = ax.twinx()
            # every metric its line over the evaluations that have it (pretraining: vl/<dataset>/<metric>, each
            # dataset evaluated after its own parts)
            for k in dict.fromkeys(k for r in evals for k in r['eval']):
                have = [r for r in evals if r['eval'].get(k) is not None]
                acc.plot([r['step'] for r in have], [r['eval'][k] for r in have], marker='o', ms=2.5, lw=0.8, label=k)
            acc.set_ylabel('accuracy', fontsize=8)
            acc.tick_params(labelsize=7)
            acc.legend(fontsize=6, loc='center right')
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
        fig.savefig(opt.out, dpi=80)
    except OSError as e:  # (a file in the path's way, permission, a full disk)
        raise SystemExit(f'--out {opt.out}: cannot write it: {e.strerror or e}') from None
    print(f'wrote {opt.out}')


if __name__ == '__main__':
    main()
