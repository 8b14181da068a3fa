"""pyproject.toml stays buildable: the license as an SPDX string (the table form is deprecated by
setuptools and stops building in 2027), with a setuptools that reads it."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_string_and_setuptools_reads_it():
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in data["build-system"]["requires"]  # PEP 639 license strings: setuptools 77
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))


def test_kernels_import_nothing_from_dnd_scale():
    """`kernels/` (installed as dnd_kernels) is a leaf: the trainer uses it, never the reverse."""
    import ast

    offenders = []
    for path in sorted((Path(__file__).resolve().parents[1] / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "dnd_scale"]
    assert offenders == []


def test_artifact_file_names_are_spelled_by_their_owners_only():
    """An artifact's file name (a module-level constant such as store.COLLECT_META) is spelled in code
    by the module that owns it alone: a message or path elsewhere builds it from the constant, so a
    renamed file is renamed in one place. Docstrings may name the files for the reader."""
    import ast
    import re

    package = Path(__file__).resolve().parents[1] / "dnd_scale"
    trees = {path.name: ast.parse(path.read_text()) for path in sorted(package.glob("*.py"))}
    name = re.compile(r"[\w-]+\.(json|jsonl|yaml|safetensors)")
    owners: dict[str, set[str]] = {}
    for module, tree in trees.items():
        for node in (n for n in tree.body if isinstance(n, ast.Assign)):
            for value in ast.walk(node.value):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and name.fullmatch(value.value):
                    owners.setdefault(value.value, set()).add(module)
    # Also the generic names of any Hugging Face model's files, which messages name as kinds of file.
    del owners["config.json"], owners["model.safetensors"]
    found = set()
    for module, tree in trees.items():
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found |= {(module, file) for file, owned in owners.items()
                          if module not in owned and re.search(rf"(?<![\w.*]){re.escape(file)}\b", node.value)}
    assert found == set(), "build these names from their owner's constant"
