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
