"""Reports: per-layer costs, the self-contained HTML page and its plots."""

import base64
import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import secateurs as sc
from secateurs.convert import report_dict
from secateurs.report import kept_matrix, layer_of, render_html, write_report

from zoo import build


@pytest.mark.parametrize(("name", "layer"), [
    ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
    ("model.layers.0.mlp.experts.3.w1.weight", "model.layers.0"),
    ("resnet.encoder.stages.0.layers.1.layer.0.convolution.weight", "resnet.encoder.stages.0.layers.1"),
    ("layer1.0.conv1.weight", "layer1.0"),
    ("embeddings.word_embeddings.weight", "embeddings"),
    ("lm_head.weight", "lm_head"),
    ("weight", "(model)"),
])
def test_layer_names(name, layer):
    assert layer_of(name) == layer


class _Sections(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def pruned_report(tmp_path_factory):
    model, inputs = build("bert")
    report = sc.prune(model, inputs, layers=1, heads=0.5, ffn=0.25, nm="2:4", round_to=1)
    data = report_dict(report, {"note": "test"}, Path("<script>alert(1)</script>"),
                       quality={"held-out cosine": 0.9})
    folder = tmp_path_factory.mktemp("report")
    return report, data, folder, write_report(folder, data)


def test_report_files_parse_and_show_every_section(pruned_report):
    report, data, folder, written = pruned_report
    assert sorted(written) == ["depth.png", "kept.png", "layers.png", "report.html", "report.json"]
    assert json.loads((folder / "report.json").read_text())["params_after"] == report.params_after
    for name in ("depth.png", "kept.png", "layers.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _Sections()
    page.feed((folder / "report.html").read_text())
    assert page.sections == ["summary", "layers", "kept", "removed", "sparsity", "frozen", "recipe"]
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert base64.b64decode(page.images[0].split(",", 1)[1])[:4] == b"\x89PNG"
    text = " ".join(page.text)
    for frozen in report.frozen:
        assert frozen.reason in text
    assert "held-out cosine" in text and "encoder.layer.0" in text and "2:4" in text
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_untrusted_names_are_escaped(pruned_report):
    _, data, folder, _ = pruned_report
    page = (folder / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_per_layer_costs_follow_removed_blocks(pruned_report):
    report, data, _, _ = pruned_report
    removed = {n for d in report.depth for n, _ in d.removed}
    rows = {r.name: r for r in report.layers}
    assert removed and all(rows[n].params_after == 0 and rows[n].flops_after == 0 for n in removed)
    assert sum(r.params_after for r in report.layers) == report.params_after
    assert sum(r.flops_before for r in report.layers) == pytest.approx(report.flops_before)
    kinds, layers, grid = kept_matrix(data["changes"])
    assert kinds == ["ffn", "heads"] and not set(layers) & removed
    assert all(v is not None and 0 < v < 1 for row in grid for v in row)


def test_html_renders_from_json_alone(pruned_report):
    _, _, folder, _ = pruned_report
    data = json.loads((folder / "report.json").read_text())
    assert render_html(data).count("<section") == 7


def test_screenshot_in_a_headless_browser(pruned_report, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("no headless browser (chromium / google-chrome) installed")
    _, _, folder, _ = pruned_report
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,2400", (folder / "report.html").as_uri()], check=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
