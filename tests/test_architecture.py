"""The layout of the package: one core, thin shells."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lungcbir"
#: The shells: the command line, and the web app with its routes.
SHELLS = {"cli", "web", "views"}


def _is_shell(path: Path) -> bool:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] in SHELLS or parts[0].startswith("web")


def _imported(tree: ast.AST, module: Path) -> set[str]:
    """Top-level names of ``lungcbir`` modules the file imports (relative imports resolved)."""
    package = module.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            target = [*base, *(node.module.split(".") if node.module else [])]
            found = [".".join(target)] if node.module else [".".join([*target, alias.name]) for alias in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            if parts[0] == "lungcbir" and len(parts) > 1:
                names.add(parts[1])
    return names


def test_no_core_module_imports_the_cli_or_the_web():
    core = [path for path in PACKAGE.rglob("*.py") if not _is_shell(path)]
    assert len(core) > 10  # the walk found the package
    offenders = {}
    for path in core:
        shells = {name for name in _imported(ast.parse(path.read_text()), path)
                  if name in SHELLS or name.startswith("web") and name != "websecurity"}
        if shells:
            offenders[str(path.relative_to(PACKAGE))] = sorted(shells)
    assert offenders == {}


def test_the_import_check_sees_relative_and_absolute_imports(tmp_path):
    module = PACKAGE / "research" / "example.py"  # where it would be; not written
    tree = ast.parse("from ..web import create_app\nimport lungcbir.cli\nfrom .. import views\nfrom . import x\n")
    assert _imported(tree, module) >= {"web", "cli", "views", "research"}
