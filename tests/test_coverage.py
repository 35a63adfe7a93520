"""Every family of the coverage zoo (``families.py``) passes the oracles, or fails for the reason listed here.

Oracles: bit-identical at ratio 0; at ``ratio=0.3`` at least 5% of the parameters removed and the output shape
kept; the pruned model exported to ONNX equals PyTorch in ONNX Runtime. ``tools/zoo.py`` prints the same as the
README's table.
"""

import importlib.util

import pytest

from families import FAMILIES, check

pytest.importorskip("onnxruntime")

# Families that do not pass yet, with what stops them (each listed in the README's table and in
# docs/limitations.md). A listed family that starts passing fails this test: take it off the list.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name, tmp_path):
    fam = FAMILIES[name]
    if fam.source in ("torchvision", "timm") and importlib.util.find_spec(fam.source) is None:
        pytest.skip(f"{fam.source} is not installed")
    outcome = check(name, str(tmp_path))
    if name in KNOWN:
        assert any(KNOWN[name] in p for p in outcome.problems), outcome.problems
        return
    assert outcome.problems == []
    assert outcome.onnx_error is not None or fam.onnx is not None
