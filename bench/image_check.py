"""python -m bench.image_check [--record FILE | --check FILE]: what the package, reference/ and
bench/ use of torch, triton and numpy, against the versions of the GPU image.

The lent GPU machine has its own torch, triton and numpy (torch 2.11, triton 3.6, numpy 2.5),
not the ones this repository is developed with. A name that exists here and not there would fail
the first GPU run on a fact that no GPU was needed to know. This module lists every dotted name
the code reaches through those modules (``torch.library.custom_op``, ``tl.math.exp2``, ``from
triton.runtime import driver``: an AST scan, ``uses``) and resolves each in the running
environment (``resolve``). ``--record`` runs in an environment with the image's versions and
writes what resolved there; the test (tests/test_image_check.py) checks in CI that every name the
code uses now is in that record and resolved, so a new name fails until it is recorded again.
"""

import argparse
import ast
import importlib
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCANNED = ("mhpo_kernels", "reference", "bench")
MODULES = ("torch", "triton", "numpy")
# A name reached through an object the code made rather than through the module (a tensor's
# method) is not scanned: only chains that start at an imported module or one of its aliases.


def _files():
    for top in SCANNED:
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def _chain(node):
    """``a.b.c`` as ["a", "b", "c"], or None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def uses(paths=None):
    """Every dotted name under torch, triton or numpy that the scanned files reach, sorted."""
    found = set()
    for path in paths or _files():
        tree = ast.parse(open(path).read(), path)
        _mark_parents(tree)
        aliases = {}          # local name -> dotted module path
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in MODULES:
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                        found.add(a.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in MODULES:
                    for a in node.names:
                        found.add(f"{node.module}.{a.name}")
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None), ast.Attribute):
                chain = _chain(node)
                if chain and chain[0] in aliases:
                    found.add(".".join([aliases[chain[0]]] + chain[1:]))
    return sorted(found)


def _mark_parents(tree):
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child._parent = node


def resolve(name):
    """True if ``name`` (a.b.c) is a module or an attribute reachable from one, here."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        except Exception:
            return False
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            # a submodule not imported by its parent: import it whole
            try:
                importlib.import_module(name)
                return True
            except Exception:
                return False
        return True
    return False


def versions():
    out = {"python": sys.version.split()[0]}
    for m in MODULES:
        try:
            out[m] = importlib.import_module(m).__version__
        except Exception as e:
            out[m] = f"not importable: {type(e).__name__}"
    return out


def record():
    names = uses()
    return {"versions": versions(), "names": {n: resolve(n) for n in names}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.image_check", description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="write what resolves in this environment to FILE")
    args = parser.parse_args(argv)
    result = record()
    missing = [n for n, ok in result["names"].items() if not ok]
    if args.record:
        with open(args.record, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
            f.write("\n")
    print(json.dumps(result["versions"]), f"{len(result['names'])} names, {len(missing)} missing", *missing, sep="\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
