"""Layers import downward only, and the core needs no torch.

The import-linter contracts in pyproject.toml ("[tool.importlinter]") check every package —
cli, testing, bench, demo, api, tensors, dcp, store, codecs, backend — statically, function-
level imports included; the runtime test checks that importing the torch-free entry points
really leaves torch out of ``sys.modules``."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "code",
    [
        "import ckptstore",
        "import ckptstore.store",
        "import ckptstore.codecs",
        "import ckptstore.backend",
        "import ckptstore.cli.main",
        "import ckptstore.transfer",  # its functions import torch, the module does not
        # the torch-free facade, used as a user would
        "import ckptstore, tempfile; ckptstore.Store",
    ],
)
def test_core_does_not_import_torch(code):
    full = f"import sys; {code}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True)
    assert proc.returncode == 0, f"{code!r} imported torch: {proc.stderr}"


def test_store_list_runs_without_torch(tmp_path):
    """``ckptstore.Store(url).list()`` on a real store, in a process that never imports
    torch (the store is written by a child that does)."""
    url = str(tmp_path / "s")
    write = f"import torch, ckptstore; ckptstore.save({{'w': torch.ones(4096)}}, {url!r}, step=3)"
    subprocess.run([sys.executable, "-c", write], check=True)
    read = (
        "import sys, ckptstore; "
        f"rows = ckptstore.Store({url!r}).list(); "
        "assert [r.step for r in rows] == [3], rows; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_import_contracts():
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- no package reaches into another's private names --------------------------------------
PACKAGE = ROOT / "ckptstore"

PRIVATE_ACROSS_PACKAGES_ALLOWED: dict[tuple[str, str], str] = {}
"""(file relative to the repository root, ``module.name``) → why that file may use a private
name of another package. Empty: every such use so far was made public or moved."""


def _subpackage(module: str) -> str:
    """The part of ckptstore a module belongs to: the first component after ``ckptstore``
    (``ckptstore.store.gc_plan`` → ``store``, ``ckptstore.api`` → ``api``, ``ckptstore`` → "")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    if not is_package:
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but a chain of names."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses_across_packages(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, ``module.name``) of each private name of another ckptstore package that the
    file at ``path`` imports (``from ckptstore.x import _name``, a private module in the
    path) or reads off an imported module (``layout._name``, ``ckptstore.x._name``)."""
    importer = _module_of(path)
    own = _subpackage(importer)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits: list[tuple[int, str]] = []
    modules: dict[str, str] = {}  # local name → the ckptstore module it is bound to

    def check_path(module: str, line: int) -> None:
        parts = module.split(".")
        for i, part in enumerate(parts):
            if _is_private(part) and _subpackage(module) != own:
                hits.append((line, ".".join(parts[: i + 1])))
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, path.name == "__init__.py")
            if module != "ckptstore" and not module.startswith("ckptstore."):
                continue
            check_path(module, node.lineno)
            for alias in node.names:
                target = f"{module}.{alias.name}"
                if _is_private(alias.name) and _subpackage(target) != own:
                    hits.append((node.lineno, target))
                if _is_module(target):
                    modules[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "ckptstore":
                    continue
                check_path(alias.name, node.lineno)
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules["ckptstore"] = "ckptstore"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Del):
            continue
        chain = _dotted(node)
        if chain is None or chain[0] not in modules:
            continue
        module = modules[chain[0]]
        for part in chain[1:]:  # follow submodules; stop at the first other attribute
            if _is_module(f"{module}.{part}"):
                module = f"{module}.{part}"
                continue
            if _is_private(part) and _subpackage(module) != own and part == chain[-1]:
                hits.append((node.lineno, f"{module}.{part}"))
            break
    return sorted(set(hits))


def test_private_uses_across_packages_are_caught(tmp_path, monkeypatch):
    """The check itself: each form it must catch, and what it must let pass."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    pkg = tmp_path / "ckptstore"
    for sub in ("store", "codecs"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "codecs" / "quantize.py").write_text("_HEADER = 1\nPUBLIC = 2\n")
    (pkg / "store" / "layout.py").write_text("_KEY = 1\n")
    user = pkg / "store" / "user.py"
    user.write_text(
        "from ckptstore.codecs.quantize import _HEADER, PUBLIC\n"  # 1: hit
        "from ckptstore.codecs import quantize as q\n"
        "import ckptstore.codecs.quantize\n"
        "from ckptstore.store import layout\n"
        "from . import layout as near\n"
        "x = q._HEADER + q.PUBLIC\n"  # 6: hit
        "y = ckptstore.codecs.quantize._HEADER\n"  # 7: hit
        "z = layout._KEY + near._KEY\n"  # same package: fine
        "from ckptstore.errors import __all__\n"  # dunder: fine
    )
    assert private_uses_across_packages(user) == [
        (1, "ckptstore.codecs.quantize._HEADER"),
        (6, "ckptstore.codecs.quantize._HEADER"),
        (7, "ckptstore.codecs.quantize._HEADER"),
    ]


def test_no_private_name_is_used_across_packages():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for line, name in private_uses_across_packages(path):
            if (rel, name) not in PRIVATE_ACROSS_PACKAGES_ALLOWED:
                found.append(f"{rel}:{line}: {name}")
    assert not found, "private names used across packages:\n" + "\n".join(found)
