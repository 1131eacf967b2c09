"""Typed config keys. Each layer declares its keys as a dataclass beside the code that reads them, as nanoGPT's
GPTConfig sits beside its model: model.ModelConfig, dataset.DataConfig, agent.TrainConfig. A field has a type, a
default and a one-line help, and says what values it takes (choices, least, length); agent.check_keys, the
`--help` of the scripts and README's key table all come from these fields.

The JSON configs stay flat: a run's args is one dict of every key (agent.load_args), as in the original.
"""
import dataclasses
import json
import os
import typing


def key(default, help, choices=None, least=None, length=None):
    """A config field. choices: the values it takes; least: its smallest value (of each element for a list);
    length: a list's length. A list key must not be empty."""
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, least=least, length=length)
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
        if meta['least'] is not None and v < meta['least']:
            return f'must be >= {meta["least"]}, got {v!r}'
        return None
    if meta['length'] is not None and len(v) != meta['length']:
        return f'must be a list of {meta["length"]} {elem.__name__}s, got {len(v)}: {v!r}'
    if not v:
        return 'must not be empty'
    for x in v:
        if type(x) is not elem:
            return f'must hold {elem.__name__}s, got {type(x).__name__} {x!r} in {v!r}'
        if meta['least'] is not None and x < meta['least']:
            return f'must hold values >= {meta["least"]}, got {x!r} in {v!r}'
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


def pretrained(load, name, key):
    """load(name), a transformers from_pretrained; a model id that is neither a local directory nor in the Hugging
    Face cache (offline, or a typo) is a FileNotFoundError naming the key, not transformers' note on the network."""
    try:
        return load(name)
    except OSError as e:
        if os.path.isdir(os.path.expanduser(name)):
            raise
        raise FileNotFoundError(f'{key}: {name!r} is not a local directory and not in the Hugging Face cache (fetch it '
                                f'once where there is network, or name a directory holding its config.json): '
                                f'{str(e).splitlines()[0]}') from e


def local_dir(value, key):
    """A value written as a local path (/, ./, ../, ~) must exist: transformers would take it for a model id and
    speak of repo ids or the network. -> value."""
    if value.startswith(('/', './', '../', '~')) and not os.path.isdir(os.path.expanduser(value)):
        where = '' if os.path.isabs(os.path.expanduser(value)) else f' (relative to the current directory, {os.getcwd()})'
        raise FileNotFoundError(f'{key}: no directory {value}{where}')
    return value
