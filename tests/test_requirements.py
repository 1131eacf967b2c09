"""requirements.txt declares every distribution the code imports: our own imports directly, and the imports of
DALL-E, which forgets to declare `attr` (a fresh venv then fails in extract_vq)."""
import ast
import importlib.metadata as md
import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def canonical(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def declared():
    """Distributions named in requirements.txt."""
    names = set()
    for line in open(os.path.join(ROOT, 'requirements.txt')):
        line = line.split('#')[0].strip()
        if line:
            names.add(canonical(re.match(r'[A-Za-z0-9._-]+', line).group()))
    return names


def closure(names):
    """names plus everything they require (recursively; extras, and what a marker left uninstalled, left out)."""
    queue, seen = list(names), set()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:  # a requirement whose marker excludes this Python
            continue
        for req in reqs:
            if 'extra ==' not in req:
                queue.append(canonical(re.match(r'[A-Za-z0-9._-]+', req).group()))
    return seen


def imported_modules(paths):
    """Top-level module names imported anywhere in these files (relative imports excluded)."""
    mods = set()
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module.split('.')[0])
    return mods


def distributions_of(mods):
    """{module: distribution} for the modules that come from an installed distribution (not stdlib, not ours)."""
    owner = md.packages_distributions()
    return {m: canonical(owner[m][0]) for m in mods if m not in sys.stdlib_module_names and m in owner}


def py_files(*dirs):
    return [os.path.join(d, f) for d in dirs for f in sorted(os.listdir(d)) if f.endswith('.py')]


def test_our_imports_are_declared():
    files = py_files(ROOT, os.path.join(ROOT, 'tests'), os.path.join(ROOT, '_tools'))
    local = {os.path.basename(f)[:-3] for f in files}
    mods = imported_modules(files) - local
    dists = distributions_of(mods)
    assert set(mods) - set(dists) - set(sys.stdlib_module_names) == set(), 'imported but not installed'
    missing = {m: d for m, d in dists.items() if d not in declared()}
    assert missing == {}, f'imported by the code, not in requirements.txt: {missing}'


def test_dall_e_imports_are_installed_by_requirements():
    pkg = os.path.dirname(importlib.util.find_spec('dall_e').origin)
    dists = distributions_of(imported_modules(py_files(pkg)) - {'dall_e'})
    assert dists['attr'] == 'attrs'
    missing = {m: d for m, d in dists.items() if d not in closure(declared())}
    assert missing == {}, f'DALL-E imports these, and nothing in requirements.txt installs them: {missing}'
