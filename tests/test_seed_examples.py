"""The user's API document (docs/panther-nn-api.rst): every code example runs verbatim, in order,
in one namespace (as a reader pasting them into one session would)."""
import pathlib
import re
import warnings

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "panther-nn-api.rst"


def code_blocks():
    text = DOC.read_text()
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text):
        lines = [line[3:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


BLOCKS = code_blocks()
NAMESPACE = {"__name__": "seed_examples"}


def test_document_has_the_examples():
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs_verbatim(index, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the "aggressive" config's parameter-count warning
        exec(compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec"), NAMESPACE)
    out = capsys.readouterr().out
    for expected in re.findall(r"# \((\d+(?:, \d+)*)\)", BLOCKS[index]):
        # the documented output shape comments, e.g.  print(...)  # (64, 256)
        assert f"torch.Size([{expected}])" in out
