"""The package's layers point one way: no import cycle between its parts, and no module imports
a private name (``_name``, or anything of a ``_module``) of a package it is not inside."""

import ast
import pathlib

import numres

ROOT = pathlib.Path(numres.__file__).parent


def _modules():
    """``{dotted module name: (path, is a package __init__)}`` of every numres module."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        init = parts[-1] == "__init__"
        found[".".join(parts[:-1] if init else parts)] = (path, init)
    return found


def _imports(name, path, init):
    """``(imported module, imported names)`` of every import statement, at any depth."""
    package = name if init else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module if not node.level else \
                ".".join(p for p in (base, node.module) if p)
            yield module, tuple(alias.name for alias in node.names)


def _part(module):
    """The layer a module belongs to: its subpackage of numres, or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_private_name_of_another_package():
    modules = _modules()
    wrong = []
    for name, (path, init) in modules.items():
        for module, names in _imports(name, path, init):
            if not module.startswith("numres"):
                continue
            parts = module.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not (name + ".").startswith(owner + "."):
                        wrong.append(f"{name} imports {module}")
                    break
            else:
                owner = module if module in modules and modules[module][1] else \
                    module.rpartition(".")[0]
                for imported in names:
                    if imported.startswith("_") and f"{module}.{imported}" not in modules \
                            and not (name + ".").startswith(owner + "."):
                        wrong.append(f"{name} imports {imported} from {module}")
    assert wrong == []


def test_no_import_cycle_between_the_parts():
    """Parts: ``numres.models``, ``numres.hub``, ... and each top-level module; ``numres``'s
    own ``__init__`` (which gathers the public names) and ``__main__`` are left out."""
    modules = _modules()
    edges = {}
    for name, (path, init) in modules.items():
        if name in ("numres", "numres.__main__"):
            continue
        for module, names in _imports(name, path, init):
            # ``from numres import hub`` imports the module numres.hub
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                if target.startswith("numres.") and _part(target) != _part(name):
                    edges.setdefault(_part(name), set()).add(_part(target))
    done = set()

    def visit(node, trail):
        if node in trail:
            raise AssertionError(" -> ".join(trail[trail.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, trail + [node])
        done.add(node)
    for node in sorted(edges):
        visit(node, [])
    assert edges["numres.models"] >= {"numres.backends", "numres.hub"}
