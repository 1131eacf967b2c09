"""Sample N frames of every video in a folder into the frame files dataset.py reads (docs/violet.md#data-formats).

    python _tools/extract_video-frame.py --path=_data/msrvtt --sample=5 [--workers 8] [--out FILE]
        reads _data/_msrvtt/*.mp4, writes _data/msrvtt.pkl = {video_id: [base64 JPEG, ...]} (the original's)
    python _tools/extract_video-frame.py --videos DIR --ext mp4,avi,gif --sample 5 --layout tsv|v2 \\
        --out _data/img_msrvtt [--shard_size 0]
        writes _data/img_msrvtt.tsv + .lineidx ('tsv') or + .id2lineidx.pkl ('v2', VIOLETv2's); with
        --shard_size S > 0, shards of S videos: _data/img_webvid2.5m_train_<k>.tsv + index (the pretraining parts)
    python _tools/extract_video-frame.py --videos CC3M/images --ext jpg,png --sample 1 --layout tsv \
        --shard_size 500000 --out _data/img_cc3m_train          # images: one frame each

Frames: dataset.read_video (frames int(n*(i+1)) of the F frames, n = F / (N+1); only those are decoded, converted
to RGB as the original's PyAV to_image() converted them; --upright turns a phone's rotated clip upright, which the
original did not), each encoded as RGB JPEG with PIL's defaults, base64 ASCII; the video id is the file name without
every '.<ext>' in it, as the original's .replace('.mp4', '') (hidden files are not read, as its glob read none). An
image is one frame: a JPEG is stored as its own bytes, another format (PNG, ...) encoded as the frames are.
Resumable: every output file is written under a temporary name and renamed when complete (the index last), so
a crash never leaves a partial shard; a rerun skips the videos already in complete outputs and writes the
rest into new shards (or, without shards, rewrites the one file with the old rows plus the new). <out>.extract.json
records --sample and --upright: a rerun with another --upright is refused (the frames cannot tell). Ctrl-C writes the
videos read so far. Files of one video id in different folders (--recursive) are all failed: none is kept.
Failures never stop the batch: each unreadable video (or one with fewer frames than --sample, which
dataset.read_video refuses) is named on stderr and listed with its reason in <out>.failed.json, written only when
a video failed (a stale one from an earlier run is removed); the exit status is non-zero when no video could be read.
A worker process that dies on a video (FFmpeg crashing, the out-of-memory killer) fails that video alone
(in_processes).
"""
import argparse, collections, functools, gc, glob, os, signal, sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from dataset import (MAX_FRAMES, WriteError, frame_b64, load_json, load_pickle, remove_stale_tmp, video_b64,  # noqa: E402
                     write_json, write_pickle)
from config import int_at_least  # noqa: E402
from extract_tsv import frames_shape_problem, read_tsv, write_tsv  # noqa: E402

extract_video, jpeg_b64 = video_b64, frame_b64  # their names in this tool until 2026-11-29, for scripts importing it


def list_videos(dir_in, exts=('mp4',), recursive=False):
    """-> [(video id, path)] of the files dir_in/*.<ext>, sorted by id, named as the original's glob('_X/*.mp4') and
    .replace('.mp4', '') named them: the id is the file name without every '.<ext>' in it (clip.mp4.mp4 is "clip");
    hidden files (a name starting with '.', as macOS's ._clip.mp4 copies) are skipped as glob skips them. Extensions
    match in any case (a camera's C.MP4 under mp4). Of two files of one id, the one listed first is the one the
    original read: of the first extension of `exts`, spelled as given (a.mp4 before a.MP4); extract_to names the
    others. A broken link is listed: read_video names it. recursive: the files of every folder below dir_in too
    (WebVid's videos/<page_dir>/<videoid>.mp4), each named by its file name alone; hidden folders are skipped."""
    rank = {e.lower(): k for k, e in enumerate(exts)}
    found = []
    for folder, subfolders, names in os.walk(dir_in) if recursive else [(dir_in, [], os.listdir(dir_in))]:
        subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
        for name in names:
            ext = os.path.splitext(name)[1]
            path = os.path.join(folder, name)
            if name.startswith('.') or ext[1:].lower() not in rank or os.path.isdir(path):
                continue
            found.append((name.replace(ext, ''), rank[ext[1:].lower()], ext[1:] not in exts, name, path))
    return [(vid, path) for vid, *_, path in sorted(found)]


def extract_all(videos, sample, workers=1, progress=True, desc=None, upright=False):
    """Yield (video id, path, frames or None, failure reason or None) for each (id, path), in order; a tqdm bar
    in videos/s."""
    read = functools.partial(video_b64, sample=sample, upright=upright)
    paths = [path for _, path in videos]
    results = map(read, paths) if workers <= 1 else in_processes(read, paths, workers)
    with tqdm(total=len(videos), ascii=True, disable=not progress, desc=desc, unit='video') as bar:
        for (frames, reason), (vid, path) in zip(results, videos):  # results first: its pool ends with it
            if reason is not None:
                tqdm.write(f'skipped: {reason}', file=sys.stderr)
            bar.update(1)
            yield vid, path, frames, reason


# a worker's initializer: Ctrl-C (SIGINT to the terminal's whole process group) is the main process's to handle, which
# saves the videos read so far (each worker printed a KeyboardInterrupt traceback of its own). A partial of the
# builtin, not a function of this tool: a spawned worker could not import it when the tool is imported by path.
ignore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)


def in_processes(read, paths, workers, ahead=8):
    """Yield read(path) for each path, in order, from `workers` processes (at most `ahead` videos a process in
    flight). A process that dies (FFmpeg crashing on a file, the out-of-memory killer) would leave
    multiprocessing.Pool waiting for ever: here the videos in flight that have no result are read again one at a
    time in a process of their own, and the one whose process dies is failed with that reason; the others go on."""
    i = 0  # paths[:i] are yielded
    gc.collect()  # (garbage a forked worker inherits would be freed there, where the threads it may refer to are not)
    while i < len(paths):
        pool, flight = ProcessPoolExecutor(workers, initializer=ignore_sigint), collections.deque()
        try:
            while i < len(paths):
                while len(flight) < ahead * workers and i + len(flight) < len(paths):
                    flight.append(pool.submit(read, paths[i + len(flight)]))
                result = flight[0].result()
                flight.popleft()
                i += 1
                yield result
        except BrokenProcessPool:
            pass
        finally:
            pool.shutdown(cancel_futures=True)
        solo = None
        try:
            for future, path in zip(flight, paths[i:]):
                if future.done() and not future.cancelled() and future.exception() is None:  # read before it died
                    result = future.result()
                else:
                    solo = solo or ProcessPoolExecutor(1, initializer=ignore_sigint)
                    try:
                        result = solo.submit(read, path).result()
                    except BrokenProcessPool:
                        solo.shutdown()
                        solo, result = None, (None, f'{path}: the process reading it died (FFmpeg crashing on the '
                                                    f'file, or memory running out)')
                i += 1
                yield result
        finally:
            if solo:
                solo.shutdown()


def extract_dir(dir_in, sample, path_out=None, workers=1, progress=True, upright=False):
    """Extract every dir_in/*.mp4 in memory; write the pkl to path_out (if given). -> (pkl dict sorted by id, [bad paths])."""
    pkl, bad = {}, []
    for vid, path, frames, _ in extract_all(list_videos(dir_in), sample, workers, progress, os.path.basename(dir_in), upright):
        if frames is None:
            bad.append(path)
        else:
            pkl[vid] = frames
    if path_out is not None:
        write_pickle(pkl, path_out)
    return pkl, bad


INDEX = {'tsv': '.lineidx', 'v2': '.id2lineidx.pkl'}


def output_prefix(out, layout):
    """--out -> the prefix output_files() names: a pkl file (.pkl optional) or the prefix of a TSV and its index
    (.tsv optional). The other layout's extension and an existing folder are refused (they wrote f.tsv.pkl,
    f.pkl.tsv or folder.pkl, which no run reads, while the summary named --out)."""
    if os.path.isdir(out):
        sys.exit(f'--out {out} is a folder: name the output file in it (e.g. {os.path.join(out, "img_mydata")})')
    other = ('.tsv', '.lineidx') if layout == 'pkl' else ('.pkl',)
    if out.endswith(other):
        sys.exit(f'--out {out}: a {os.path.splitext(out)[1]} name for --layout {layout}, which writes ' +
                 ('a .pkl (or give --layout tsv / v2)' if layout == 'pkl' else 'a .tsv and its index (or give --layout pkl)'))
    return out[:-len('.tsv')] if layout != 'pkl' and out.endswith('.tsv') else out


def output_files(out, layout, shard):
    """-> (data file, index file or None) of output `shard` (None: the single, unsharded output)."""
    prefix = out if shard is None else f'{out}_{shard}'
    if layout == 'pkl':
        return prefix if prefix.endswith('.pkl') else prefix + '.pkl', None
    return prefix + '.tsv', prefix + INDEX[layout]


def read_output(out, layout, shard):
    """-> {video id: frames} of a complete output file (its index present), or None."""
    data, index = output_files(out, layout, shard)
    if not os.path.isfile(index or data):
        return None
    frames = load_pickle(data) if layout == 'pkl' else read_tsv(data, index)
    wrong = frames_shape_problem(frames)
    if wrong:  # (a file of another kind at --out: rewriting it with the new videos would keep its junk)
        raise ValueError(f'{data}: {wrong}; give another --out')
    return frames


def write_output(frames, out, layout, shard):
    data, index = output_files(out, layout, shard)
    write_pickle(frames, data) if layout == 'pkl' else write_tsv(frames, data, index)


def extract_to(dir_in, out, sample, layout='pkl', shard_size=0, workers=1, exts=('mp4',), progress=True, upright=False,
               recursive=False):
    """Extract dir_in's videos (recursive: its subfolders' too) into `out` (resumably, see the module doc). ->
    (videos written by this run, videos found already written, {path: failure reason})."""
    if layout == 'pkl' and shard_size:
        raise ValueError('--shard_size needs --layout tsv or v2 (a pkl is one file)')
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # not after decoding every video: it crashed there
    except OSError as e:  # a file where a folder of the path should be, permission, a read-only disk
        raise ValueError(f'--out {out}: cannot make its folder {os.path.dirname(os.path.abspath(out))}: '
                         f'{e.strerror or e}') from None
    remove_stale_tmp(os.path.dirname(os.path.abspath(out)), os.path.basename(out))  # what a kill -9 left of a shard
    videos, failed, first = [], {}, {}
    listed = list_videos(dir_in, exts, recursive)
    files = collections.defaultdict(list)
    for vid, path in listed:
        files[vid].append(path)
    # (--recursive) clips of one name in different folders: which one a text means is unknown
    ambiguous = {vid for vid, paths in files.items() if len({os.path.dirname(p) for p in paths}) > 1}
    for vid, path in listed:
        if vid in ambiguous:
            others = ', '.join(p for p in files[vid] if p != path)
            failed[path] = f'{path}: the same video id "{vid}" as {others} in another folder: none of them is kept (rename them)'
            tqdm.write(f'skipped: {failed[path]}', file=sys.stderr)
        elif vid in first:  # a.mp4 and a.avi are both video "a": the first extension's is the original's
            failed[path] = f'{path}: the same video id "{vid}" as {first[vid]} (rename one)'
            tqdm.write(f'skipped: {failed[path]}', file=sys.stderr)
        elif layout != 'pkl' and ('\t' in vid or '\n' in vid):  # (it stopped the run after every video was decoded)
            failed[path] = f'{path}: its name holds a tab or a newline, which end a TSV field or row (rename it)'
            tqdm.write(f'skipped: {failed[path]}', file=sys.stderr)
        else:
            first[vid] = path
            videos.append((vid, path))
    done, shards = {}, []  # already written: video id -> shard; the complete shards' numbers
    if shard_size:
        found = glob.glob(glob.escape(out) + '_*' + INDEX[layout])
        suffixes = [p[len(out) + 1:-len(INDEX[layout])] for p in found]
        for k in sorted(int(x) for x in suffixes if x.isdigit()):
            shard = read_output(out, layout, k)
            check_sample(shard, sample, output_files(out, layout, k)[0])
            done.update(dict.fromkeys(shard, k))
            shards.append(k)
        old = {}
    else:
        old = read_output(out, layout, None) or {}
        check_sample(old, sample, output_files(out, layout, None)[0])
        done = dict.fromkeys(old)
    settings = settings_file(out, layout)
    known = load_json(settings) if os.path.isfile(settings) else None
    if known is not None and not isinstance(known, dict):
        raise ValueError(f'{settings}: not what this tool writes ({{"sample", "upright"}}); remove it')
    if done and known is not None and known.get('upright') != upright:  # (the frames cannot tell: a mixed set)
        raise ValueError(f'{output_files(out, layout, None if not shard_size else "*")[0]} was written '
                         f'{"with" if known.get("upright") else "without"} --upright: give the same, or another --out')
    for vid in sorted(ambiguous & set(done)):
        tqdm.write(f'note: video "{vid}" is in the output from an earlier run, though its files in several folders are '
                   f'all failed now: which clip it holds is unknown (another --out starts afresh)', file=sys.stderr)
    if done and known is None:
        tqdm.write(f'note: {settings} is missing (written before the tool recorded it): whether the videos already '
                   f'there were turned upright is not checked', file=sys.stderr)
    pending = [(vid, path) for vid, path in videos if vid not in done]
    if pending and (known is not None or not done):  # before the first output (a run killed mid-way is checked too)
        write_json({'sample': sample, 'upright': upright}, settings, indent=1)
    written, batch, interrupted = 0, {}, False
    next_shard = (k for k in range(10 ** 9) if k not in shards)  # fills the numbers of crashed shards first
    try:
        for vid, path, frames, reason in extract_all(pending, sample, workers, progress, os.path.basename(out), upright):
            if frames is None:
                failed[path] = reason
                continue
            batch[vid] = frames
            if shard_size and len(batch) == shard_size:
                full, batch = batch, {}  # (not written again should the write be interrupted)
                write_output(full, out, layout, next(next_shard))
                written += len(full)
    except KeyboardInterrupt:  # Ctrl-C: the videos read so far are written, and a rerun goes on from them
        interrupted = True
    if shard_size and batch:
        write_output(batch, out, layout, next(next_shard))
    elif not shard_size and batch:
        write_output({**old, **batch}, out, layout, None)
    written += len(batch)
    if not written and not done and os.path.isfile(settings):  # (no video could be read: no output to describe)
        os.remove(settings)
    report = failed_report(out, layout)
    if failed:  # (also when interrupted: those seen so far)
        write_json({'videos': dir_in, 'sample': sample, 'failed': failed}, report, indent=1)
    elif os.path.exists(report):  # an earlier run's failures were retried and read this time: its list is stale
        os.remove(report)
    if interrupted:
        raise Interrupted(f'interrupted: {written} videos written ({len(done)} were there before)' +
                          (f', {len(failed)} unreadable listed in {report}' if failed else '') +
                          '; the same command goes on with the others')
    return written, len(done), failed


def check_sample(frames, sample, path):
    """The videos already written must have `sample` frames: a rerun with another --sample mixed both counts in one
    set (whose odd videos are then bad samples)."""
    other = next((vid for vid, f in frames.items() if len(f) != sample), None)
    if other is not None:
        raise ValueError(f'{path} holds videos of {len(frames[other])} frames (e.g. "{other}"), not --sample {sample}: '
                         f'give the --sample it was written with, or another --out')


class Interrupted(Exception):
    """Ctrl-C during extraction, after the videos read so far were written."""


def settings_file(out, layout):
    """<out>.extract.json: how the frames were extracted ({"sample", "upright"}), which the frames cannot tell; a rerun
    with another --upright is refused."""
    return beside(out, layout, '.extract.json')


def beside(out, layout, suffix):
    """The file of output `out` named `suffix` beside its data file (that name without its extension)."""
    return output_files(out, layout, None)[0].rsplit('.', 1)[0] + suffix


def failed_report(out, layout):
    """The failures list of output `out`: <out>.failed.json (beside the data file, without its extension)."""
    return beside(out, layout, '.failed.json')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', help='X: videos in _X/ (next to X), output X.pkl (or X.tsv + index)')
    parser.add_argument('--videos', help='the video folder (instead of _X/)')
    parser.add_argument('--sample', required=True, type=int_at_least(1), help='frames per video (4 pretraining, 5 downstream, 1 images)')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument('--out', default=None, help='output: the pkl file, or the prefix of the .tsv + index (default X)')
    parser.add_argument('--layout', default='pkl', choices=['pkl', 'tsv', 'v2'])
    parser.add_argument('--shard_size', type=int_at_least(0), default=0, help='videos per TSV shard <out>_<k>; 0: one file')
    parser.add_argument('--recursive', action='store_true',
                        help="read the videos of every folder below the video folder too (WebVid's "
                             "videos/<page_dir>/<videoid>.mp4), each named by its file name")
    parser.add_argument('--ext', default='mp4', help='video file extensions, comma separated (e.g. mp4,avi,gif; '
                                                     'images: jpg,png with --sample 1)')
    parser.add_argument('--upright', action='store_true',
                        help="turn videos with a rotation in their header (phones' portrait clips) upright; the "
                             "original stored their frames as encoded, on their side")
    args = parser.parse_args()
    if not args.path and not (args.videos and args.out):
        parser.error('give --path, or --videos and --out')
    if args.sample > MAX_FRAMES and args.layout != 'v2':  # (a long extraction the model could not take)
        parser.error(f'--sample {args.sample}: VIOLET takes at most {MAX_FRAMES} frames a video; only the v2 layout '
                     f'stores more (training samples size_frame of them)')
    if args.path:
        head, name = os.path.split(os.path.normpath(args.path))
        dir_in = args.videos or os.path.join(head, '_' + name)
        out = args.out or (args.path + '.pkl' if args.layout == 'pkl' else args.path)
    else:
        dir_in, out = args.videos, args.out
    out = output_prefix(out, args.layout)
    if os.path.isfile(dir_in):
        sys.exit(f'--videos {dir_in} is a file: give the folder that holds the videos (predict.py reads single files)')
    if not os.path.isdir(dir_in):
        sys.exit(f'no video folder {dir_in}' + ('' if args.videos else
                                                 f' (--path {args.path} reads the videos of _{name} beside it, as the '
                                                 f'original; --videos names any folder)'))
    exts = args.ext.split(',')
    files = [f for f in os.listdir(dir_in) if os.path.isfile(os.path.join(dir_in, f))]
    hidden = sum(f.startswith('.') for f in files)
    if not list_videos(dir_in, exts, args.recursive):  # nothing to write: say what the folder holds, not an empty file
        found = sorted({os.path.splitext(f)[1] for f in files if not f.startswith('.')} - {''})
        folders = [f for f in os.listdir(dir_in) if os.path.isdir(os.path.join(dir_in, f))]
        sys.exit(f'no {" or ".join("*." + e for e in exts)} file in {dir_in}'
                 + (f' (it has {", ".join(found)} files: see --ext)' if found else '')
                 + (f' (it has {hidden} hidden files, whose names start with ".": never read)' if hidden else '')
                 + (f' (it has {len(folders)} folders: their videos are read with --recursive)'
                    if folders and not args.recursive else ''))
    want = {e.lower() for e in exts}
    others = collections.Counter(os.path.splitext(f)[1] or 'without extension' for f in files
                                 if not f.startswith('.') and os.path.splitext(f)[1].lower()[1:] not in want)
    if hidden:
        others['hidden (a name starting with ".")'] = hidden
    if others:  # a folder of .mp4 and .avi files under the default --ext mp4 lost its .avi videos without a word
        print(f'{dir_in}: not read (not --ext {args.ext}): ' + ', '.join(f'{n} {e}' for e, n in sorted(others.items())),
              file=sys.stderr)
    folders = sum(os.path.isdir(os.path.join(dir_in, f)) for f in os.listdir(dir_in))
    if folders and not args.recursive:  # (the videos of subfolders were left out without a word)
        print(f'{dir_in}: {folders} folder(s) in it not read (only its own files are): --recursive reads them',
              file=sys.stderr)
    try:
        written, before, failed = extract_to(dir_in, out, args.sample, args.layout, args.shard_size, args.workers, exts,
                                              upright=args.upright, recursive=args.recursive)
    except ValueError as e:
        sys.exit(str(e))
    except Interrupted as e:
        sys.exit(str(e))
    except WriteError as e:  # a full disk: the outputs written before are whole, and a rerun goes on from them
        sys.exit(f'{e}; the files written before are whole: make room and run the same command again (it goes on '
                 f'with the videos not yet written)')
    data = output_files(out, args.layout, None if not args.shard_size else '*')[0]
    print(f'{data}: {written} videos x {args.sample} frames written, {before} already there; '
          f'{len(failed)} unreadable skipped' + (f' (listed in {failed_report(out, args.layout)})' if failed else ''))
    if written + before == 0:
        sys.exit(f'no video could be read in {dir_in}')


if __name__ == '__main__':
    main()
