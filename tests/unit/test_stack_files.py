"""Every stack file shipped under ops/ loads and validates."""

from pathlib import Path

import pytest

from schemas.stack import load_stack

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "ops").rglob("*.toml"))


def test_the_default_stack_exists():
    assert ROOT / "ops" / "stack.toml" in FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_stack_file_loads(path):
    stack = load_stack(path)
    assert stack.run.dir
