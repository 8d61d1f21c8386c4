"""Layers point down only (docs/architecture.md): interop -> runtime -> compiler -> (kernels, npu).

Every import of every module under compiler/, kernels/, npu/, runtime/ and interop/ (imports
inside functions included) is read with `ast` and checked against the layer rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import isthmus

ROOT = Path(isthmus.__file__).resolve().parent
LAYERS = ("compiler", "kernels", "npu", "runtime", "interop")
# What each layer may not import. "facade" is `import isthmus` / `from isthmus import load, ...`;
# the CLI is cli.py and the top-level modules of its commands.
CLI = ("isthmus.cli", "isthmus.cli_profile", "isthmus.chat_repl")
FORBIDDEN = {
    "compiler": ("isthmus.runtime", "isthmus.interop", *CLI, "facade"),
    "kernels": ("isthmus.compiler", "isthmus.runtime", "isthmus.interop", *CLI, "facade"),
    "npu": ("isthmus.compiler", "isthmus.runtime", "isthmus.interop", *CLI, "facade"),
    "runtime": ("isthmus.interop", *CLI),
    "interop": (),
}


def _is_submodule(name: str) -> bool:
    return (ROOT / f"{name}.py").is_file() or (ROOT / name / "__init__.py").is_file()


def imported(tree: ast.AST):
    """(line, dotted module) for each import; `from isthmus import x` names isthmus.x when x is a
    submodule, else the facade."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, "facade" if a.name == "isthmus" else a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "isthmus":
                for a in node.names:
                    yield node.lineno, f"isthmus.{a.name}" if _is_submodule(a.name) else "facade"
            else:
                yield node.lineno, node.module


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for layer in LAYERS:
        banned = FORBIDDEN[layer]
        for f in sorted((root / layer).rglob("*.py")):
            for line, module in sorted(imported(ast.parse(f.read_bytes(), str(f)))):
                if any(module == b or module.startswith(b + ".") for b in banned):
                    found.append(f"{f.relative_to(root)}:{line} imports {module}")
    return found


def test_layers_point_down_only():
    found = violations()
    assert not found, "imports against the layer rule (interop -> runtime -> compiler -> kernels, npu):\n" + \
        "\n".join(found)


def test_the_walk_sees_every_form_of_import(tmp_path):
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "bad.py").write_text(
        "import isthmus\n"
        "from isthmus import load\n"
        "from isthmus import errors\n"
        "def f():\n"
        "    from isthmus.runtime.generate import chat\n"
        "    import isthmus.interop.app\n")
    (tmp_path / "npu").mkdir()
    (tmp_path / "npu" / "bad.py").write_text("from isthmus.compiler.ir import Graph\n")
    for layer in ("kernels", "runtime", "interop"):
        (tmp_path / layer).mkdir()
    (tmp_path / "runtime" / "bad.py").write_text("from isthmus.cli import main\nfrom isthmus.compiler import ir\n"
                                                 "from isthmus.chat_repl import run\n")
    assert violations(tmp_path) == [
        "compiler/bad.py:1 imports facade", "compiler/bad.py:2 imports facade",
        "compiler/bad.py:5 imports isthmus.runtime.generate", "compiler/bad.py:6 imports isthmus.interop.app",
        "npu/bad.py:1 imports isthmus.compiler.ir", "runtime/bad.py:1 imports isthmus.cli",
        "runtime/bad.py:3 imports isthmus.chat_repl",
    ]
