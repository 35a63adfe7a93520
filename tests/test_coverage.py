"""Every family of the coverage zoo (``families.py``) passes the oracles, or fails for the reason listed here.

Oracles: bit-identical at ratio 0; at ``ratio=0.3`` at least 5% of the parameters removed and the output shape
kept; the pruned model exported to ONNX equals PyTorch in ONNX Runtime. ``tools/zoo.py`` prints the same as the
coverage table (docs/coverage.md; the README has a digest).
"""

import importlib.util
from pathlib import Path

import pytest

from families import FAMILIES, PRUNES, check

pytest.importorskip("onnxruntime")

# Families that do not pass yet, with what stops them (each listed in docs/coverage.md and in
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


def _table(path, first: str) -> dict[str, list[str]]:
    """The rows of the markdown table in ``path`` whose header starts with ``| first |``, by family name."""
    rows, inside = {}, False
    for line in (Path(__file__).resolve().parents[1] / path).read_text().splitlines():
        if line.startswith(f"| {first} |"):
            inside = True
        elif inside and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif inside and not line.startswith("|"):
            break
    return rows


def test_coverage_tables_list_every_family_and_agree():
    full = _table("docs/coverage.md", "family")
    digest = _table("README.md", "family")
    assert list(full) == list(FAMILIES) == list(digest)
    for name, (source, kind, removed, pruned, *_rest) in full.items():
        assert source == FAMILIES[name].source and kind == FAMILIES[name].kind, name
        assert set(PRUNES[name]) <= set(pruned.split(", ")), name
        d_kind, d_removed, d_pruned, _also, d_peer = digest[name]
        assert (d_kind, d_removed, d_pruned) == (kind, removed, pruned), name
        assert d_peer == full[name][-1] or full[name][-1].startswith(d_peer), name
