"""The --help of every command line and benchmark opens with a whole sentence."""

import ast

import pytest
from conftest import REPO_ROOT

FILES = sorted([*(REPO_ROOT / "scripts").glob("*.py"), *(REPO_ROOT / "benchmarks").glob("*.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_help_description_is_not_cut_mid_sentence(path):
    # bench_learning, bench_models and bench_train showed the first line of a wrapped docstring
    # sentence ("... per sign and", "... (MFU) of the", "... shuffled gather,").
    source = path.read_text()
    if "description=__doc__.splitlines()[0]" not in source:
        return
    first_paragraph = ast.get_docstring(ast.parse(source)).split("\n\n")[0]
    assert "\n" not in first_paragraph, f"{path.name}: use the whole first paragraph"
