"""The import rules of docs/architecture.md: each folder imports only what its layer may."""

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "captioning"


def _imports(file: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(folder: str, forbidden: tuple[str, ...], allowed_files: dict[str, tuple[str, ...]]) -> list[str]:
    found = []
    for file in sorted((PACKAGE / folder).glob("*.py")):
        allowed = allowed_files.get(file.name, ())
        for name in sorted(_imports(file)):
            if any(name == f or name.startswith(f + ".") for f in forbidden) and not any(
                    name == a or name.startswith(a + ".") for a in allowed):
                found.append(f"{file.relative_to(PROJECT_ROOT)} imports {name}")
    return found


@pytest.mark.parametrize(("folder", "forbidden", "allowed_files"), [
    ("models", ("pytorch_lightning", "lightning", "hydra", "omegaconf", "captioning.data", "captioning.evaluation",
                "captioning.module", "captioning.config", "captioning.checkpoints"), {}),
    ("data", ("captioning.models", "captioning.evaluation", "captioning.module", "hydra", "omegaconf",
              "pytorch_lightning"), {"datamodule.py": ("pytorch_lightning",)}),
    ("evaluation", ("captioning.models", "captioning.module", "pytorch_lightning", "torch"),
     {"distributed.py": ("torch",)}),
    # the demo server holds a Captioner (or an export's): it never builds models or reads configs itself
    ("serve", ("captioning.models", "captioning.module", "captioning.config", "captioning.checkpoints",
               "pytorch_lightning", "hydra", "omegaconf", "torch"), {}),
])
def test_each_folder_imports_only_what_its_layer_may(folder: str, forbidden: tuple[str, ...],
                                                     allowed_files: dict[str, tuple[str, ...]]) -> None:
    assert _violations(folder, forbidden, allowed_files) == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    file = tmp_path / "late.py"
    file.write_text("def f():\n    from captioning.models.encoders import CNNEncoder\n    return CNNEncoder\n")
    assert "captioning.models.encoders" in _imports(file)
