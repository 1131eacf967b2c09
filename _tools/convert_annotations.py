r"""Public annotation files -> txt_<task>.json as dataset.py reads it (README "Real data").

    python _tools/convert_annotations.py msrvtt-retrieval --src DIR --out _data/txt_msrvtt-retrieval.json \
        [--train 7k|9k]
        DIR: the captions, MSRVTT_data.json (in CLIP4Clip's msrvtt_data.zip) or train_val_videodatainfo.json +
        test_videodatainfo.json (the MSR-VTT release); MSRVTT_JSFUSION_test.csv (JSFusion's 1k-A test: key,
        vid_key, video_id, sentence); for --train 9k, MSRVTT_train.9k.csv.
        train: every caption of the training videos: 7k (the default, the original's: ClipBERT's protocol, the
        7,010 videos MSR-VTT puts in train and validate; MSRVTT_train.7k.csv when present) or 9k (CLIP4Clip's:
        MSRVTT_train.9k.csv); val and test: the 1,000 JSFusion (video, sentence) pairs.
    python _tools/convert_annotations.py lsmdc-retrieval --src DIR --out _data/txt_lsmdc-retrieval.json
        DIR: LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, LSMDC16_challenge_1000_publictect.csv (LSMDC 2016;
        tab separated, no header: <CLIP_ID>, 4 time stamps, <SENTENCE>). One item per line (video: the clip id, the
        file name of <movie>/<CLIP_ID>.avi: extract with --recursive --ext avi); train, val and test as CLIP4Clip
        takes them (test: the 1,000-clip public test).
    python _tools/convert_annotations.py didemo-retrieval --src DIR --out _data/txt_didemo-retrieval.json
        DIR: train_data.json, val_data.json, test_data.json (LisaAnne/LocalizingMoments, one entry per moment).
        Paragraph-to-video retrieval (ClipBERT's): one item per video, its descriptions in file order joined by a
        space (repeats kept); video: the "video" field, extension included, without '.mp4': the id extraction with
        --ext mp4 gives the AWS download script's <video>.mp4 (X.avi.mp4 is X.avi, X.mp4.mp4 is X). The paragraph
        is cut at size_txt tokens.
    python _tools/convert_annotations.py msrvtt-qa --src DIR --out _data/txt_msrvtt-qa.json [--size_vocab 1000]
        DIR: train_qa.json, val_qa.json, test_qa.json (Xu et al. 2017); video_id k -> "video<k>".
    python _tools/convert_annotations.py msvd-qa --src DIR --out _data/txt_msvd-qa.json [--size_vocab 1000]
        the same files, and youtube_mapping.txt ("<clip name> vid<k>" per line); video_id k -> that clip name
        (the file name of YouTubeClips/<clip name>.avi).
    python _tools/convert_annotations.py tgif-action --src DIR --out _data/txt_tgif-action.json
    python _tools/convert_annotations.py tgif-transition --src DIR --out _data/txt_tgif-transition.json
        DIR: Train_<action|transition>_question.csv, Test_..._question.csv (Jang et al. 2017; tab separated
        despite the name, a header line, then gif_name, question, a1..a5, answer (0-4), vid_id, key).
        TGIF-QA has no validation split: val is the test split.
    python _tools/convert_annotations.py tgif-frame --src DIR --out _data/txt_tgif-frame.json [--size_vocab 1540]
        DIR: Train_frameqa_question.csv, Test_frameqa_question.csv (TGIF-QA's FrameQA, open-ended; tab separated, a
        header line, then gif_name, question, answer, type, vid_id, key, description). QA-OE as msrvtt-qa; val is the
        test split. (ClipBERT and VIOLETv2 keep 1,540 answers: --size_vocab 1540; the default is 1,000.)
    python _tools/convert_annotations.py msrvtt-mc --src DIR --out _data/txt_msrvtt-mc.json
        DIR: MSR_MC_test.csv (JSFusion's MSRVTT multiple choice; tab separated, a header line naming key, vid_key,
        a1..a5, answer: the right caption's index 0-4; vid_key "msr<k>" is MSR-VTT's video<k>). Five captions to
        choose from and no question ("question": ""). Test only: the json has "val" and "test" (the same 2,990
        questions) and no "train"; VIOLET scores it with the MSRVTT retrieval model (main_qamc.py --eval with a
        retrieval or pretraining checkpoint: the QA-MC head takes their 1-output head), training refuses it.
    python _tools/convert_annotations.py lsmdc-mc --src DIR --out _data/txt_lsmdc-mc.json
        DIR: LSMDC16_multiple_choice_train.csv, LSMDC16_multiple_choice_valid.csv,
        LSMDC16_multiple_choice_test_randomized.csv (LSMDC 2016 Movie Multiple-Choice Test; tab separated, no header;
        <CLIP_ID>, 4 time stamps, then train / valid: the correct sentence and 4 distractors, test: 5 sentences and
        the answer's index 1-5). The video is the clip id (its file <movie>/<CLIP_ID>.avi: extract with --recursive
        --ext avi); no question. Train and valid list the right sentence first: here it goes to a place drawn from the
        clip id (the same every run), so that a model scoring options alike (argmax takes the first) is not right
        by it; the test file is already shuffled and kept as it is.
    python _tools/convert_annotations.py webvid2.5m --src DIR --out _data/txt_webvid2.5m.json
        DIR: results_2M_train.csv, results_2M_val.csv (m-bain/webvid); ids: videoid, captions: name.
    python _tools/convert_annotations.py cc3m --src DIR --out _data/txt_cc3m.json
        DIR: Train_GCC-training.tsv, Validation_GCC-1.1.0-Validation.tsv; ids: the row index in 8 digits.
        (pretraining texts: {"train": {id: [caption]}, "val": {...}}, as the original's)

QA-OE: the answer vocabulary is the --size_vocab most frequent training answers (ties: first seen first), in
alphabetical order, as in the original's released txt_msvd-qa.json (its class 482 is "man", 985 "woman"): the
official QA-OE checkpoints' classes are in that order. An answer outside it is "answer": -1 (its text kept in
"answer_text"), scored wrong, never dropped.
Every converter prints its split sizes next to the published ones. A missing file, a malformed line or an
unknown video stops it with a message naming the file and the line.
"""
import argparse, collections, csv, hashlib, io, json, os, sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import int_at_least  # noqa: E402
from dataset import DataError, WriteError, read_text, write_json  # noqa: E402  (whole or not at all; a full disk named)

# published split sizes: MSR-VTT (Xu et al. 2016) with JSFusion's 1k-A split (Yu et al. 2018),
# MSRVTT-QA and MSVD-QA (Xu et al. 2017), TGIF-QA (Jang et al. 2017), MSRVTT-MC (Yu et al. 2018),
# LSMDC-MC (the LSMDC 2016 Movie Multiple-Choice Test's README: its Statistics), LSMDC retrieval (the clips of
# LSMDC16_annos_training / _val and the 1,000-clip public test: the counts the retrieval papers (CLIP4Clip, Luo et
# al. 2021) cite, not checked against the files here), DiDeMo (Hendricks et al. 2017's videos per split, as
# collaborative-experts' README gives them; its own lists hold 8,392 / 1,065 / 1,004)
TRAIN_9K = '9,000 videos, 180,000 captions'  # msrvtt-retrieval --train 9k
PUBLISHED = {
    'msrvtt-retrieval': {'train': '7,010 videos, 140,200 captions', 'val': '1,000 videos', 'test': '1,000 videos'},
    'lsmdc-retrieval': {'train': '101,079 videos', 'val': '7,408 videos', 'test': '1,000 videos'},
    'didemo-retrieval': {'train': '8,395 videos', 'val': '1,065 videos', 'test': '1,004 videos'},
    'msrvtt-qa': {'train': '158,581 questions', 'val': '12,278 questions', 'test': '72,821 questions'},
    'msvd-qa': {'train': '30,933 questions', 'val': '6,415 questions', 'test': '13,157 questions'},
    'tgif-action': {'train': '20,475 questions', 'val': '2,274 questions', 'test': '2,274 questions'},
    'tgif-transition': {'train': '52,704 questions', 'val': '6,232 questions', 'test': '6,232 questions'},
    'tgif-frame': {'train': '39,392 questions', 'val': '13,691 questions', 'test': '13,691 questions'},
    'msrvtt-mc': {'val': '2,990 questions', 'test': '2,990 questions'},
    'lsmdc-mc': {'train': '101,079 questions', 'val': '7,408 questions', 'test': '10,053 questions'},
    'webvid2.5m': {'train': 'about 2.5 million videos', 'val': '5,000 videos'},
    'cc3m': {'train': '3,318,333 images', 'val': '15,840 images'},
}


class BadAnnotation(ValueError):
    """Unusable annotation input; the message names the file and the line or entry."""


def need(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'missing annotation file: {path}')
    return path


def read_json(path):
    try:
        return json.loads(read_text(need(path)))
    except json.JSONDecodeError as e:
        raise BadAnnotation(f'{path}: not valid JSON ({e})') from e


def read_json_list(path, what):
    """A JSON file holding a list (of `what`: annotations, questions) -> the list."""
    items = read_json(path)
    if not isinstance(items, list):
        raise BadAnnotation(f'{path}: expected a list of {what}, got {type(items).__name__}')
    return items


def field(entry, key, where):
    if not isinstance(entry, dict) or key not in entry:
        raise BadAnnotation(f'{where}: no key "{key}"')
    return entry[key]


def lines_of(path):
    """A text file's lines, split at line feeds alone (CRLF too): str.splitlines also splits at U+0085, U+2028 and
    other characters a question or caption may hold, which cut a line in two."""
    lines = read_text(need(path)).replace('\r\n', '\n').split('\n')
    return lines[:-1] if lines and lines[-1] == '' else lines


def read_video_list(path, columns=('video_id',)):
    """A CSV with a header naming `columns` (MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv) -> [(line, row dict)];
    a row of more or fewer fields than the header (an unquoted comma) or an empty value in `columns` is named."""
    reader = csv.reader(io.StringIO(read_text(need(path)), newline=''))
    header = next(reader, None) or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise BadAnnotation(f'{path} line 1: no "{missing[0]}" column (has {header})')
    rows = []
    for fields in reader:
        if not fields:  # (a blank line)
            continue
        if len(fields) != len(header):
            raise BadAnnotation(f'{path} line {reader.line_num}: {len(fields)} fields, the header has {len(header)} '
                                f'(a comma outside quotes?)')
        row = dict(zip(header, fields))
        empty = next((c for c in columns if not row[c].strip()), None)
        if empty:
            raise BadAnnotation(f'{path} line {reader.line_num}: "{empty}" is empty')
        rows.append((reader.line_num, row))
    return rows


def msrvtt_captions(src):
    """-> ({video: [caption, ...]} in file order, {video: its MSR-VTT split}, the files read), from MSRVTT_data.json
    (CLIP4Clip's download) or else the release's two videodatainfo files (the same "videos" and "sentences")."""
    merged = os.path.join(src, 'MSRVTT_data.json')
    paths = [merged] if os.path.isfile(merged) else [os.path.join(src, n) for n in ('train_val_videodatainfo.json',
                                                                                   'test_videodatainfo.json')]
    captions, splits = collections.defaultdict(list), {}
    for path in paths:
        info = read_json(path)
        for i, s in enumerate(field(info, 'sentences', path)):
            captions[field(s, 'video_id', f'{path} sentences[{i}]')].append(field(s, 'caption', f'{path} sentences[{i}]'))
        for i, v in enumerate(info.get('videos', []) if isinstance(info, dict) else []):
            split = v.get('split') if isinstance(v, dict) else None
            splits[field(v, 'video_id', f'{path} videos[{i}]')] = (split, path)
    return captions, splits, ' / '.join(os.path.basename(p) for p in paths)


def msrvtt_retrieval(src, train='7k'):
    captions, splits, read = msrvtt_captions(src)
    listed = os.path.join(src, f'MSRVTT_train.{train}.csv')
    if train == '9k' or os.path.isfile(listed):
        videos = [(f'{listed} line {line}', row['video_id']) for line, row in read_video_list(listed)]
    else:  # 7k without its list: the videos MSR-VTT itself puts in train and validate
        no_split = next((v for v, (split, _) in splits.items() if split is None), None)
        if not splits or no_split is not None:
            raise BadAnnotation(f'{read}: ' + (f'video "{no_split}" has no "split"' if splits else 'no "videos" list')
                                + f' to take the 7k training videos from; give {listed}')
        videos = [(f'{splits[v][1]} video "{v}"', v) for v, (split, _) in splits.items()
                  if split in ('train', 'validate')]
    out = {'train': []}
    for where, vid in videos:
        if vid not in captions:
            raise BadAnnotation(f'{where}: video "{vid}" has no caption in {read}')
        out['train'] += [{'video': vid, 'caption': c} for c in captions[vid]]
    path = os.path.join(src, 'MSRVTT_JSFUSION_test.csv')
    rows = read_video_list(path, ('video_id', 'sentence'))
    unknown = next(((line, r['video_id']) for line, r in rows if r['video_id'] not in captions), None)
    if unknown:
        raise BadAnnotation(f'{path} line {unknown[0]}: video "{unknown[1]}" is not an MSR-VTT video of {read}')
    out['val'] = out['test'] = [{'video': r['video_id'], 'caption': r['sentence']} for _, r in rows]
    return out


LSMDC_RETRIEVAL_FILES = [('train', 'LSMDC16_annos_training.csv'), ('val', 'LSMDC16_annos_val.csv'),
                         ('test', 'LSMDC16_challenge_1000_publictect.csv')]


def lsmdc_retrieval(src):
    """LSMDC 2016 (tab separated, no header; <CLIP_ID>, <START_ALIGNED>, <END_ALIGNED>, <START_EXTRACTED>,
    <END_EXTRACTED>, <SENTENCE>) -> one {"video": clip id, "caption": sentence} per line, in file order. A clip id
    may come with more than one sentence (each its own item, as the lines of MSR-VTT's captions); the sentence is
    the line's rest after the fifth tab, quotes and all (split at tabs alone: no CSV quoting)."""
    return {split: [{'video': row[0].strip(), 'caption': row[5]}
                    for _, row in lsmdc_rows(os.path.join(src, name), 1, '<SENTENCE>')]
            for split, name in LSMDC_RETRIEVAL_FILES}


def lsmdc_rows(path, n_rest, rest):
    """An LSMDC 2016 file (tab separated, no header): <CLIP_ID>, 4 time stamps, then n_rest fields (`rest` says which) ->
    [(line, fields)]; white space after the last field is no field of its own, the clip id must not be empty."""
    rows = []
    for n, text in enumerate(lines_of(path), 1):
        if not text.strip():
            continue
        row = text.rstrip().split('\t')
        if len(row) != 5 + n_rest:
            raise BadAnnotation(f'{path} line {n}: {len(row)} tab-separated fields, expected {5 + n_rest} '
                                f'(<CLIP_ID>, 4 time stamps, {rest})')
        if not row[0].strip():
            raise BadAnnotation(f'{path} line {n}: the clip id is empty')
        rows.append((n, row))
    return rows


def didemo_retrieval(src):
    """DiDeMo's {train,val,test}_data.json (LisaAnne/LocalizingMoments: a list of {"annotation_id", "description",
    "video", "times", "dl_link", ...}, one entry per moment) -> paragraph-to-video retrieval: one item per video, in
    order of its first entry, its caption every description of the video in file order joined by one space
    (repeated descriptions kept). The video is the id extraction gives the AWS download's <video>.mp4: the "video"
    field (a file name with its extension) without '.mp4' (X.avi stays X.avi, X.mp4 is X)."""
    out = {}
    for split in ['train', 'val', 'test']:
        path = os.path.join(src, f'{split}_data.json')
        entries = read_json_list(path, 'annotations')
        paragraphs = {}
        for i, entry in enumerate(entries):
            where = f'{path}[{i}]'
            video, description = field(entry, 'video', where), field(entry, 'description', where)
            if not isinstance(video, str) or not video.strip() or not isinstance(description, str):
                raise BadAnnotation(f'{where}: "video" must be a non-empty str and "description" a str, got '
                                    f'{video!r:.60} and {description!r:.60}')
            paragraphs.setdefault(video, []).append(description)
        empty = next((v for v, ds in paragraphs.items() if not ' '.join(ds).strip()), None)
        if empty is not None:
            raise BadAnnotation(f'{path}: video "{empty}" has only empty descriptions')
        # the AWS download saves <video>.mp4, which extraction (--ext mp4) names without every '.mp4' in it
        out[split] = [{'video': v.replace('.mp4', ''), 'caption': ' '.join(ds)} for v, ds in paragraphs.items()]
    return out


def sizes_retrieval(out):
    return {s: f'{len({it["video"] for it in items}):,} videos, {len(items):,} captions' for s, items in out.items()}


def answer_vocab(answers, size):
    """The `size` most frequent answers (ties: first seen first)."""
    return [a for a, _ in collections.Counter(answers).most_common(size)]


def qa_oe(splits, size_vocab):
    """{split: [(video, question, answer text)]} -> the QA-OE json: "vocab" (the size_vocab most frequent training
    answers, alphabetical) and per split {"video", "question", "answer": its class or -1, "answer_text"}."""
    vocab = sorted(answer_vocab([a for _, _, a in splits['train']], size_vocab))
    index = {a: i for i, a in enumerate(vocab)}
    out = {'vocab': vocab}
    for split, items in splits.items():
        out[split] = [{'video': video, 'question': question, 'answer': index.get(answer, -1), 'answer_text': answer}
                      for video, question, answer in items]
    return out


def xu_qa(src, size_vocab, video_name):
    """MSRVTT-QA / MSVD-QA: {split}_qa.json = [{"answer", "id", "question", "video_id", ...}]."""
    splits = {}
    for split in ['train', 'val', 'test']:
        path = os.path.join(src, f'{split}_qa.json')
        items = read_json_list(path, 'questions')
        splits[split] = [(f'{path}[{i}]', it) for i, it in enumerate(items)]
    for w, it in splits['train']:  # (every training answer first: they make the vocabulary)
        field(it, 'answer', w)
    for split, items in splits.items():
        rows = []
        for where, it in items:
            answer = str(field(it, 'answer', where))
            question, video_id = field(it, 'question', where), field(it, 'video_id', where)
            if not isinstance(question, str) or isinstance(video_id, bool) or not isinstance(video_id, (int, str)):
                raise BadAnnotation(f'{where}: "question" must be a str and "video_id" an int or str, got '
                                    f'{question!r:.40} and {video_id!r:.40}')
            rows.append((video_name(video_id, where), question, answer))
        splits[split] = rows
    return qa_oe(splits, size_vocab)


def msrvtt_qa(src, size_vocab):
    return xu_qa(src, size_vocab, lambda k, where: f'video{k}')


def msvd_qa(src, size_vocab):
    path = os.path.join(src, 'youtube_mapping.txt')
    names = {}
    for line, text in enumerate(lines_of(path), 1):
        if text.strip():
            parts = text.split()
            if len(parts) != 2 or not parts[1].startswith('vid'):
                raise BadAnnotation(f'{path} line {line}: expected "<clip name> vid<k>", got {text.strip()!r}')
            names[parts[1]] = parts[0]

    def video_name(k, where):
        if f'vid{k}' not in names:
            raise BadAnnotation(f'{where}: video_id {k} (vid{k}) is not in {path}')
        return names[f'vid{k}']
    return xu_qa(src, size_vocab, video_name)


TGIF_COLUMNS = ['gif_name', 'question', 'a1', 'a2', 'a3', 'a4', 'a5', 'answer', 'vid_id', 'key']
TGIF_FRAME_COLUMNS = ['gif_name', 'question', 'answer', 'type', 'vid_id', 'key', 'description']


def tgif_rows(path, columns, n_checked):
    """A TGIF-QA question file (tab separated despite its .csv, a header line) -> [(line, fields)]; the header's first
    n_checked names must be columns' (so another question type's file is refused), every row has n_checked fields."""
    lines = lines_of(path)
    if not lines or lines[0].split('\t')[:n_checked] != columns[:n_checked]:
        raise BadAnnotation(f'{path} line 1: expected the header {columns} (tab separated)')
    rows = []
    for n, text in enumerate(lines[1:], 2):
        if not text.strip():
            continue
        row = text.split('\t')
        if len(row) < n_checked:
            raise BadAnnotation(f'{path} line {n}: {len(row)} tab-separated fields, expected {len(columns)}')
        rows.append((n, row))
    return rows


def tgif_mc(src, kind):
    out = {}
    for split, name in [('train', 'Train'), ('test', 'Test')]:
        path = os.path.join(src, f'{name}_{kind}_question.csv')
        out[split] = []
        for n, row in tgif_rows(path, TGIF_COLUMNS, 8):
            if row[7] not in '01234' or len(row[7]) != 1:
                raise BadAnnotation(f'{path} line {n}: answer {row[7]!r} is not an option index 0-4')
            out[split].append(dict({'video': row[0], 'question': row[1], 'answer': int(row[7])},
                                   **{f'option_{i}': row[2 + i] for i in range(5)}))
    out['val'] = out['test']
    return {s: out[s] for s in ['train', 'val', 'test']}


def tgif_frame(src, size_vocab):
    """TGIF-QA FrameQA (open-ended): Train_frameqa_question.csv / Test_frameqa_question.csv, header gif_name, question,
    answer (a word), type (0-3: object, number, color, location), vid_id, key, description; val is the test split."""
    splits = {}
    for split, name in [('train', 'Train'), ('test', 'Test')]:
        path = os.path.join(src, f'{name}_frameqa_question.csv')
        splits[split] = []
        for n, row in tgif_rows(path, TGIF_FRAME_COLUMNS, 4):
            if not row[2].strip():
                raise BadAnnotation(f'{path} line {n}: the answer is empty')
            splits[split].append((row[0], row[1], row[2]))
    return qa_oe({'train': splits['train'], 'val': splits['test'], 'test': splits['test']}, size_vocab)


MSRVTT_MC_COLUMNS = ['vid_key', 'a1', 'a2', 'a3', 'a4', 'a5', 'answer']


def msrvtt_mc(src):
    """JSFusion's MSR_MC_test.csv (tab separated despite its .csv, a header line: key, vid_key, a1..a5, answer (0-4),
    vid_key "msr<k>" for MSR-VTT's video<k>; a video_id column, when there, must agree) -> the 2,990 caption-choice
    questions, their "question" empty. MSRVTT-MC has no training split: val and test are this one set."""
    path = os.path.join(src, 'MSR_MC_test.csv')
    lines = lines_of(path)
    header = lines[0].split('\t') if lines else []
    missing = next((c for c in MSRVTT_MC_COLUMNS if c not in header), None)
    if missing:
        raise BadAnnotation(f'{path} line 1: no "{missing}" column (tab separated; has {header})')
    col = {c: header.index(c) for c in header}
    items = []
    for n, text in enumerate(lines[1:], 2):
        if not text.strip():
            continue
        row = text.split('\t')
        if len(row) != len(header):
            raise BadAnnotation(f'{path} line {n}: {len(row)} tab-separated fields, the header has {len(header)}')
        answer, vid_key = row[col['answer']].strip(), row[col['vid_key']].strip()
        if answer not in '01234' or len(answer) != 1:
            raise BadAnnotation(f'{path} line {n}: answer {answer!r} is not an option index 0-4')
        if not (vid_key.startswith('msr') and vid_key[3:].isdigit() and vid_key[3:].isascii()):
            raise BadAnnotation(f'{path} line {n}: vid_key {vid_key!r} is not "msr<k>" (MSR-VTT\'s video<k>)')
        video = 'video' + vid_key[3:]
        if 'video_id' in col and row[col['video_id']].strip() != video:
            raise BadAnnotation(f'{path} line {n}: video_id {row[col["video_id"]].strip()!r} is not vid_key '
                                f'{vid_key!r}\'s video {video!r}')
        items.append(dict({'video': video, 'question': '', 'answer': int(answer)},
                          **{f'option_{i}': row[col[f'a{i + 1}']] for i in range(5)}))
    return {'val': items, 'test': items}


LSMDC_MC_FILES = [('train', 'LSMDC16_multiple_choice_train.csv'), ('val', 'LSMDC16_multiple_choice_valid.csv'),
                  ('test', 'LSMDC16_multiple_choice_test_randomized.csv')]


def lsmdc_mc(src):
    """LSMDC 2016 Movie Multiple-Choice Test (tab separated, no header): train and valid rows <CLIP_ID>, 4 time stamps,
    the correct sentence, 4 distractors (the correct one moved to a place drawn from the clip id); the public test's
    rows <CLIP_ID>, 4 time stamps, 5 sentences, the answer's index 1-5 (-> 0-4). The video is the clip id (the clip's file name)."""
    out = {}
    for split, name in LSMDC_MC_FILES:
        path = os.path.join(src, name)
        test = split == 'test'
        out[split] = []
        for n, row in lsmdc_rows(path, 6, '5 sentences, the answer 1-5') if test else \
                lsmdc_rows(path, 5, 'the correct sentence, 4 distractors'):
            options = row[5:10]
            if test:
                answer = row[10].strip()
                if answer not in '12345' or len(answer) != 1:
                    raise BadAnnotation(f'{path} line {n}: answer {answer!r} is not an option index 1-5')
                answer = int(answer) - 1
            else:  # the right sentence first: moved to a place drawn from the clip id (sha256: the same every
                # conversion, on every Python), the distractors in their order around it
                answer = int.from_bytes(hashlib.sha256(row[0].strip().encode()).digest()[:8], 'big') % 5
                options = options[1:answer + 1] + options[:1] + options[answer + 1:]
            out[split].append(dict({'video': row[0].strip(), 'question': '', 'answer': answer},
                                   **{f'option_{i}': options[i] for i in range(5)}))
    return out


def webvid(src):
    """WebVid's results_2M_train.csv / results_2M_val.csv (m-bain/webvid: videoid, name, page_idx, page_dir, duration,
    contentUrl) -> {"train": {videoid: [name]}, "val": {...}}, as the original's txt_webvid2.5m.json holds them
    (the videos are videos/<page_dir>/<videoid>.mp4: extract them with --recursive)."""
    out = {}
    for split in ['train', 'val']:
        path = os.path.join(src, f'results_2M_{split}.csv')
        out[split] = {}
        for _, row in read_video_list(path, ('videoid', 'name')):
            out[split].setdefault(row['videoid'].strip(), []).append(row['name'])
    return out


def cc3m(src):
    """Conceptual Captions' Train_GCC-training.tsv / Validation_GCC-1.1.0-Validation.tsv (caption TAB url, no header)
    -> {"train": {id: [caption]}, "val": {...}}, the id being the row's index in eight digits ("00000000"), as the
    original's txt_cc3m.json names them: name each downloaded image so (img2dataset: its key)."""
    out = {}
    for split, name in [('train', 'Train_GCC-training.tsv'), ('val', 'Validation_GCC-1.1.0-Validation.tsv')]:
        path = os.path.join(src, name)
        out[split] = {}
        for i, text in enumerate(lines_of(path)):
            fields = text.split('\t')
            if len(fields) != 2 or not fields[0].strip():
                raise BadAnnotation(f'{path} line {i + 1}: expected a caption, a tab and a URL, got {text[:60]!r}')
            out[split][f'{i:08d}'] = [fields[0]]
    return out


def sizes_questions(out):
    return {s: f'{len(out[s]):,} questions' for s in ['train', 'val', 'test'] if s in out}


def convert(task, src, size_vocab=1000, train='7k'):
    """-> (txt json, {split: size line}). train: msrvtt-retrieval's training videos, '7k' or '9k'."""
    if task in ('msrvtt-retrieval', 'lsmdc-retrieval', 'didemo-retrieval'):
        out = msrvtt_retrieval(src, train) if task == 'msrvtt-retrieval' else \
            lsmdc_retrieval(src) if task == 'lsmdc-retrieval' else didemo_retrieval(src)
        return out, sizes_retrieval(out)
    if task in ('msrvtt-qa', 'msvd-qa', 'tgif-frame'):
        out = {'msrvtt-qa': msrvtt_qa, 'msvd-qa': msvd_qa, 'tgif-frame': tgif_frame}[task](src, size_vocab)
        sizes = sizes_questions(out)
        for s in ['train', 'val', 'test']:
            sizes[s] += f' ({sum(it["answer"] >= 0 for it in out[s]):,} answers in the vocabulary of {len(out["vocab"])})'
        return out, sizes
    if task in ('webvid2.5m', 'cc3m'):  # pretraining: {split: {id: [caption]}}
        out = webvid(src) if task == 'webvid2.5m' else cc3m(src)
        return out, {s: f'{len(out[s]):,} {"videos" if task == "webvid2.5m" else "images"}' for s in out}
    out = msrvtt_mc(src) if task == 'msrvtt-mc' else lsmdc_mc(src) if task == 'lsmdc-mc' else \
        tgif_mc(src, task.split('-')[1])
    return out, sizes_questions(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('task', choices=list(PUBLISHED))
    parser.add_argument('--src', required=True, help='folder of the downloaded annotation files')
    parser.add_argument('--out', required=True, help='txt_<task>.json to write')
    parser.add_argument('--size_vocab', type=int_at_least(1), default=1000, help='QA-OE: answer vocabulary size (VIOLET: 1000)')
    parser.add_argument('--train', choices=['7k', '9k'], default='7k',
                        help="msrvtt-retrieval's training videos: 7k (the original's, ClipBERT's protocol) or 9k "
                             "(CLIP4Clip's, MSRVTT_train.9k.csv)")
    args = parser.parse_args()
    if args.train != '7k' and args.task != 'msrvtt-retrieval':
        parser.error(f"--train is msrvtt-retrieval's (its training videos), not {args.task}'s")
    try:
        out, sizes = convert(args.task, args.src, args.size_vocab, args.train)
    except (FileNotFoundError, BadAnnotation, DataError) as e:
        sys.exit(str(e))
    out_path = os.path.abspath(args.out)
    if os.path.dirname(out_path) == os.path.abspath(args.src) and os.path.isfile(out_path) and \
            not os.path.basename(out_path).startswith('txt_'):  # (an annotation file was replaced in silence)
        sys.exit(f'--out {args.out} is a file of --src (an annotation file): write the txt_<task>.json elsewhere')
    try:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        write_json(out, args.out)
    except (WriteError, OSError) as e:
        sys.exit(str(e) if isinstance(e, WriteError) else f'--out {args.out}: cannot make its folder: {e.strerror or e}')
    print(f'{args.out}:')
    published = {**PUBLISHED[args.task], **({'train': TRAIN_9K} if args.train == '9k' else {})}
    for split in published:
        print(f'  {split}: {sizes[split]} (published: {published[split]})')


if __name__ == '__main__':
    main()
