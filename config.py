"""Typed config keys. Each layer declares its keys as a dataclass beside the code that reads them, as nanoGPT's
GPTConfig sits beside its model: model.ModelConfig, dataset.DataConfig, agent.TrainConfig. A field has a type, a
default and a one-line help, and says what values it takes (choices, least, length); agent.check_keys, the
`--help` of the scripts and README's key table all come from these fields.

The JSON configs stay flat: a run's args is one dict of every key (agent.load_args), as in the original.
"""
import argparse
import dataclasses
import json
import math
import os
import typing

REPO = os.path.dirname(os.path.abspath(__file__))  # (the bundled files: _data/bert-tiny, the toy configs)


def key(default, help, choices=None, least=None, most=None, length=None):
    """A config field. choices: the values it takes; least / most: its smallest / largest value (of each element
    for a list); length: a list's length. A list key must not be empty; a float must be finite."""
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, least=least, most=most,
                length=length)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(*configs):
    """-> {key: dataclasses.Field} of these config classes, in their order; a key declared twice is an error."""
    out = {}
    for cls in configs:
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise TypeError(f'config key {f.name} is declared twice')
            out[f.name] = f
    return out


def defaults(cls):
    """-> {key: default} of a config class (fresh lists)."""
    return dataclasses.asdict(cls())


def type_name(t):
    """int -> 'int', list[int] -> 'list[int]'."""
    return f'list[{typing.get_args(t)[0].__name__}]' if typing.get_origin(t) is list else t.__name__


def out_of_range(meta, v, what):
    """-> the phrase for a number v outside meta's bounds (NaN and infinity are outside every range), or None."""
    if isinstance(v, float) and not math.isfinite(v):  # JSON's NaN / Infinity (or 1e400): no comparison refuses them
        return f'must {what} finite numbers, got {v!r}' if what == 'hold' else f'must be a finite number, got {v!r}'
    least, most = meta['least'], meta['most']
    if (least is not None and v < least) or (most is not None and v > most):
        bound = (f'>= {least}' if most is None else f'<= {most}' if least is None else f'in {least}..{most}')
        return f'must hold values {bound}, got {v!r}' if what == 'hold' else f'must be {bound}, got {v!r}'
    return None


def problem(f, v):
    """-> what is wrong with value v of field f (a phrase for 'key K ...'), or None when it is fine."""
    t, meta = f.type, f.metadata
    elem = typing.get_args(t)[0] if typing.get_origin(t) is list else None
    base = list if elem else t
    if not (type(v) is base or (base is float and type(v) is int)):
        return f'must be {base.__name__}, got {type(v).__name__} {v!r}'
    if meta['choices'] is not None and v not in meta['choices']:
        return f'must be one of {list(meta["choices"])}, got {v!r}'
    if elem is None:
        return out_of_range(meta, v, 'be') if base in (int, float) else None
    if meta['length'] is not None and len(v) != meta['length']:
        return f'must be a list of {meta["length"]} {elem.__name__}s, got {len(v)}: {v!r}'
    if not v:
        return 'must not be empty'
    for x in v:
        if type(x) is not elem:
            return f'must hold {elem.__name__}s, got {type(x).__name__} {x!r} in {v!r}'
        wrong = out_of_range(meta, x, 'hold')
        if wrong:
            return f'{wrong} in {v!r}'
    return None


def show(v):
    return json_like(v) if not isinstance(v, str) else (f'"{v}"' if v == '' else v)


def json_like(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, list):
        return json.dumps(v)
    return f'{v:g}' if isinstance(v, float) else str(v)


def markdown(groups):
    """README's key table: {layer title: config class} -> markdown lines."""
    lines = ['| key | type | default | meaning |', '| --- | --- | --- | --- |']
    for title, cls in groups.items():
        lines.append(f'| **{title}** | | | |')
        for f in dataclasses.fields(cls):
            lines.append(f'| `{f.name}` | {type_name(f.type)} | `{show(defaults(cls)[f.name])}` | {f.metadata["help"]} |')
    return lines


def help_text(groups):
    """The scripts' --help epilog: every key with its type, default and help."""
    out = ['config keys (in the JSON file, or --set KEY=VALUE):']
    for title, cls in groups.items():
        out.append(f'  {title}:')
        for f in dataclasses.fields(cls):
            out.append(f'    {f.name} ({type_name(f.type)}, default {show(defaults(cls)[f.name])}): '
                       f'{f.metadata["help"]}'.replace('`', ''))
    return '\n'.join(out)


def int_at_least(least):
    """An argparse type: an int >= least (argparse names the option and the value when it is not)."""
    def parse(text):
        value = int(text)  # argparse: "invalid int value"
        if value < least:
            raise argparse.ArgumentTypeError(f'must be >= {least}, got {value}')
        return value
    parse.__name__ = 'int'
    return parse


class FileError(ValueError):
    """A config file that cannot be read as one JSON object; the message names the file."""


def read_text(path):
    """A text file people hand us (a config, annotations, a question list) -> str, line ends as in the file. UTF-8
    whatever the locale says (a C or Latin-1 locale refused or misread it), a leading BOM (Windows editors, Excel's
    "CSV UTF-8") dropped; FileError naming the file and the byte when it is not UTF-8. OSError as open raises it."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise FileError(f'{path}: not UTF-8 text (byte {raw[e.start]:#x} at offset {e.start}): save it as UTF-8') from None


def read_file(path):
    """A JSON config file -> its object: UTF-8 JSON holding one object, each key once (json would keep the last of
    a repeated key without a word). FileError naming the file otherwise."""
    def once(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise FileError(f"{path}: key '{k}' is given twice")
            seen.add(k)
        return dict(pairs)
    if os.path.isdir(path):  # (a run's folder given for its args.json)
        run = os.path.join(path, 'args.json')
        raise FileError(f'{path} is a folder, not a config file' +
                        (f' (a run\'s: its config is {run}; --resume {path} goes on with a stopped run)'
                         if os.path.isfile(run) else ''))
    if not os.path.isfile(path):
        raise FileError(f'no config file {path}')
    try:
        obj = json.loads(read_text(path), object_pairs_hook=once)
    except json.JSONDecodeError as e:
        raise FileError(f'{path} is not valid JSON ({e})') from None
    except OSError as e:
        raise FileError(f'cannot read {path}: {e.strerror or e}') from None
    if not isinstance(obj, dict):
        raise FileError(f'{path} must hold a JSON object, not {type(obj).__name__}')
    return obj


def pretrained(load, name, key, whole=lambda obj: True):
    """load(name), a transformers from_pretrained. A model id is read from the Hugging Face cache when it is there
    (and whole(obj)), the network asked only when not: without network, transformers otherwise retried it for
    minutes on every run although the model was cached, unless HF_HUB_OFFLINE was set. One that is neither a local
    directory nor in the cache (offline, or a typo) is a FileNotFoundError naming the key, not transformers' note
    on the network."""
    if os.path.isdir(os.path.expanduser(name)):
        return load(os.path.expanduser(name))
    try:
        obj = load(name, local_files_only=True)
        if whole(obj):
            return obj
    except OSError:
        pass
    try:
        return load(name)
    except OSError as e:
        raise FileNotFoundError(f'{key}: {name!r} is not a local directory and not in the Hugging Face cache (fetch it '
                                f'once where there is network, or name a directory holding its config.json): '
                                f'{str(e).splitlines()[0]}') from e


def local_dir(value, key):
    """A value written as a local path (/, ./, ../, ~) must exist: transformers would take it for a model id and
    speak of repo ids or the network. -> value."""
    if value.startswith(('/', './', '../', '~')) and not os.path.isdir(os.path.expanduser(value)):
        where = ''
        if not os.path.isabs(os.path.expanduser(value)):
            # (the toy preset's ./_data/bert-tiny, its run's args.json used from another directory: where it is)
            bundled = os.path.normpath(os.path.join(REPO, value))
            there = f'; the repository has {bundled}: run from {REPO}, or add --set {key}={bundled}' \
                if os.path.isdir(bundled) else ''
            where = f' (relative to the current directory, {os.getcwd()}{there})'
        raise FileNotFoundError(f'{key}: no directory {value}{where}')
    return os.path.expanduser(value)
