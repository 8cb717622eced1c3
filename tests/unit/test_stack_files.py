"""Every stack file shipped under ops/ loads and validates (``ops/stack.toml`` is the default)."""

from pathlib import Path

import pytest

from schemas.stack import load_stack

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "ops").glob("**/*.toml"))
DEFAULT = ROOT / "ops" / "stack.toml"


@pytest.mark.skipif(not DEFAULT.exists(), reason="no ops/stack.toml in this checkout yet")
def test_the_default_stack_is_among_the_files():
    assert DEFAULT in FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_stack_file_loads(path):
    stack = load_stack(path)
    assert stack.run.dir, f"{path}: run.dir not resolved"
