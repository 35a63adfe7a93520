"""Reports for people: per-layer costs, PNG plots and a self-contained HTML page of what a run did.

``report.json`` (see :func:`secateurs.convert.report_dict`) is the source of truth; :func:`write_report` writes
it together with ``report.html`` and the PNG plots it embeds, each file atomically. The HTML can be rebuilt
from the JSON alone (``render_html``), so a report copied elsewhere renders the same.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from secateurs.backends.files import atomic_file
from secateurs.errors import CheckpointError
from secateurs.ir.aten_cost import flops_by_module
from secateurs.ir.graph import Graph
from secateurs.passes.depth import DepthRecord

__all__ = [
    "LayerCost",
    "costs_by_layer",
    "kept_matrix",
    "layer_costs",
    "layer_identities",
    "layer_renames",
    "layer_of",
    "plot_depth",
    "render_html",
    "write_report",
]

_NUMERIC = re.compile(r"^\d+$")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Parameters and FLOPs of one layer (a block of a module list, or a top-level module) before and after."""

    name: str
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float


def layer_of(name: str) -> str:
    """The report layer a parameter or module name belongs to.

    The prefix up to the first list index (``encoder.layer.3``, ``model.layers.0``, ``layer1.0``), extended to
    a second index two components later (``stages.0.layers.1``: a ResNet / Swin block, but not the experts of a
    MoE layer); names outside lists go to their top-level module (``embeddings``, ``lm_head``).
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMERIC.match(part):
            end = i + 1
            if (end + 1 < len(parts) - 1 and _NUMERIC.match(parts[end + 1]) and parts[end] != "experts"):
                end += 2
            return ".".join(parts[:end])
    return parts[0] if len(parts) > 1 else "(model)"


def layer_identities(module: nn.Module, names: Iterable[str]) -> dict[int, str]:
    """``{id(submodule): name}`` for the layer names that are submodules (to follow layers a pass renumbers)."""
    out: dict[int, str] = {}
    for name in names:
        try:
            out[id(module.get_submodule(name))] = name
        except AttributeError:
            continue
    return out


def costs_by_layer(graph: Graph, identities: Mapping[int, str] | None = None) -> dict[str, tuple[int, float]]:
    """``{layer: (params, flops)}`` of a captured graph, layers as :func:`layer_of` names them.

    With ``identities`` (from :func:`layer_identities` before a rewrite), a layer keeps the name it had then
    even when removing an earlier block of its list renumbered it.
    """
    out: dict[str, list[float]] = {}
    for name, p in graph.module.named_parameters():
        out.setdefault(layer_of(name), [0, 0.0])[0] += p.numel()
    for path, flops in flops_by_module(graph).items():
        out.setdefault(layer_of(path + ".x") if path else "(model)", [0, 0.0])[1] += flops
    rename = layer_renames(graph.module, identities or {}, out)
    return {rename.get(k, k): (int(v[0]), float(v[1])) for k, v in out.items()}


def layer_renames(module: nn.Module, identities: Mapping[int, str], names: Iterable[str]) -> dict[str, str]:
    """``{current layer name: name before the rewrite}`` for layers a pass renumbered."""
    out: dict[str, str] = {}
    for key in names:
        try:
            old = identities.get(id(module.get_submodule(key)), key)
        except AttributeError:
            continue
        if old != key:
            out[key] = old
    return out


def layer_costs(before: Mapping[str, tuple[int, float]], after: Mapping[str, tuple[int, float]]) -> list[LayerCost]:
    """Pair the costs before and after, in the order layers first appear (a removed layer costs 0 after)."""
    names = list(before) + [n for n in after if n not in before]
    return [LayerCost(n, before.get(n, (0, 0.0))[0], after.get(n, (0, 0.0))[0], before.get(n, (0, 0.0))[1],
                      after.get(n, (0, 0.0))[1]) for n in names]


# ----------------------------------------------------------------------------------------------- files
@contextmanager
def _atomic(path: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file next to ``path`` and rename it over ``path`` when the body succeeds."""
    with atomic_file(path) as tmp, open(tmp, mode) as f:
        yield f


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CheckpointError("plots need matplotlib: pip install 'secateurs[plot]'") from exc
    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _write_png(data: bytes, path: Path) -> Path:
    try:
        with _atomic(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise CheckpointError(f"cannot write plot '{path}': {exc}") from exc
    return path


def plot_depth(record: DepthRecord, path: str | os.PathLike[str]) -> Path:
    """Bar chart of every depth candidate's score, removed ones highlighted; written atomically as PNG.

    Raises:
        CheckpointError: matplotlib is missing or the file cannot be written.

    """
    return _write_png(_depth_png(dataclasses.asdict(record)), Path(path))


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else name


def _depth_png(record: Mapping[str, Any]) -> bytes:
    plt = _pyplot()
    names = [n for n, _ in record["scores"]]
    values = [v for _, v in record["scores"]]
    gone = {n for n, _ in record["removed"]}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names)), 3.2))
    ax.bar(range(len(names)), values, color=["tab:red" if n in gone else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(record["criterion"])
    ax.set_title(f"depth candidates ({record['criterion']}); red = removed")
    return _png(fig)


def _layers_png(layers: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    import numpy as np

    x = np.arange(len(layers))
    fig, axes = plt.subplots(2, 1, figsize=(max(5.0, 0.42 * len(layers) + 2), 5.4), sharex=True)
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "flops", "FLOPs")):
        ax.bar(x - 0.2, [r[f"{key}_before"] for r in layers], 0.4, label="before", color="#9bb7d4")
        ax.bar(x + 0.2, [r[f"{key}_after"] for r in layers], 0.4, label="after", color="#1f5a96")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 3))
    axes[0].legend(fontsize=8)
    axes[0].set_title("cost per layer, before and after")
    axes[1].set_xticks(x, [_short(r["name"]) for r in layers], rotation=60, ha="right", fontsize=7)
    return _png(fig)


def kept_matrix(changes: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Kinds (rows), layers (columns) and the kept fraction of each kind's channels in each layer (None: none)."""
    sums: dict[tuple[str, str], list[int]] = {}
    layers: list[str] = []
    for c in changes:
        layer = layer_of(str(c["name"]).split("[")[0])
        if layer not in layers:
            layers.append(layer)
        acc = sums.setdefault((str(c.get("kind", "channels")), layer), [0, 0])
        acc[0] += int(c["after"])
        acc[1] += int(c["before"])
    kinds = sorted({k for k, _ in sums})
    grid = [[(sums[(k, la)][0] / sums[(k, la)][1]) if (k, la) in sums and sums[(k, la)][1] else None
             for la in layers] for k in kinds]
    return kinds, layers, grid


def _kept_png(changes: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    import numpy as np

    kinds, layers, grid = kept_matrix(changes)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 2), 1.0 + 0.55 * len(kinds)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(len(kinds)):
        for j in range(len(layers)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 0.6 else "black")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_title("kept fraction per layer")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def _recovery_png(record: Mapping[str, Any]) -> bytes:
    plt = _pyplot()
    train = [(p["step"], p["train_loss"]) for p in record["curve"] if p.get("train_loss") is not None]
    held = [(p["step"], p["eval_loss"]) for p in record["curve"] if p.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    if train:
        ax.plot(*zip(*train, strict=True), label="training objective", color="#9bb7d4")
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", color="#1f5a96")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"recovery ({record['mode']}): {record['objective']}")
    ax.legend(fontsize=8)
    return _png(fig)


def _plots(data: Mapping[str, Any]) -> dict[str, bytes]:
    plots: dict[str, bytes] = {}
    if data.get("recovery") and data["recovery"].get("curve"):
        plots["recovery.png"] = _recovery_png(data["recovery"])
    if data.get("layers"):
        plots["layers.png"] = _layers_png(data["layers"])
    if data.get("changes"):
        plots["kept.png"] = _kept_png(data["changes"])
    for i, record in enumerate(data.get("depth") or []):
        plots[f"depth{i}.png" if i else "depth.png"] = _depth_png(record)
    return plots


# ------------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.tiles{display:flex;gap:1em;flex-wrap:wrap}.tile{background:#f3f6fa;border-radius:6px;padding:.6em 1em;min-width:11em}
.tile b{display:block;font-size:1.35em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .55em;text-align:left}th{background:#f3f6fa}td.n{text-align:right}
img{max-width:100%}pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:.85em}.muted{color:#777}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(before: float, after: float) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "n/a"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                         for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plots: Mapping[str, bytes], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    b64 = base64.b64encode(plots[name]).decode()
    return f"<p><img alt='{_e(alt)}' src='data:image/png;base64,{b64}'></p>"


def render_html(data: Mapping[str, Any], plots: Mapping[str, bytes] | None = None) -> str:
    """The self-contained HTML page (plots embedded) for a ``report.json`` dictionary."""
    plots = _plots(data) if plots is None else plots
    pb, pa = data.get("params_before", 0), data.get("params_after", 0)
    fb, fa = data.get("flops_before", 0.0), data.get("flops_after", 0.0)
    tiles = [("parameters", f"{pb:,} &rarr; {pa:,}", _pct(pb, pa)), ("FLOPs", f"{fb:,.0f} &rarr; {fa:,.0f}", _pct(fb, fa))]
    if data.get("latency_before") and data.get("latency_after"):
        lb, la = data["latency_before"], data["latency_after"]
        tiles.append((f"latency ({data.get('latency_runtime', 'PyTorch CPU')})",
                      f"{1e3 * lb:.2f} &rarr; {1e3 * la:.2f} ms", f"{lb / la:.2f}x faster"))
    drift = data.get("drift")
    if drift:
        tiles.append(("output drift (example inputs)", f"cosine {drift['cosine']:.4f}",
                      f"relative error {drift['rel_error']:.4f}"))
    for key, value in (data.get("quality") or {}).items():
        tiles.append((str(key), f"{value:.4g}" if isinstance(value, float) else _e(value), ""))
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>secateurs report</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>secateurs report: {_e(data.get('source', ''))}</h1>",
           "<section id='summary'><h2>Summary</h2><div class='tiles'>"]
    out += [f"<div class='tile'>{_e(t)}<b>{v}</b><span class='muted'>{_e(s)}</span></div>" for t, v, s in tiles]
    out.append("</div></section>")
    layers = data.get("layers") or []
    out.append("<section id='layers'><h2>Parameters and FLOPs per layer</h2>")
    out.append(_img(plots, "layers.png", "parameters and FLOPs per layer"))
    out.append(_table(["layer", "params before", "params after", "change", "FLOPs before", "FLOPs after"],
                      [(r["name"], f"{r['params_before']:,}", f"{r['params_after']:,}",
                        _pct(r["params_before"], r["params_after"]), f"{r['flops_before']:,.0f}",
                        f"{r['flops_after']:,.0f}") for r in layers], numeric=(1, 2, 3, 4, 5))
               if layers else "<p class='muted'>no per-layer figures</p>")
    out.append("</section><section id='kept'><h2>Kept heads and channels</h2>")
    changes = data.get("changes") or []
    if changes:
        out.append(_img(plots, "kept.png", "kept fraction per layer"))
        out.append(_table(["group", "kind", "before", "after", "size set by"],
                          [(c["name"], c.get("kind", ""), c["before"], c["after"], c.get("bound") or "the plan")
                           for c in changes], numeric=(2, 3)))
    else:
        out.append("<p class='muted'>no channel groups were pruned</p>")
    out.append("</section><section id='removed'><h2>Removed layers</h2>")
    depth = data.get("depth") or []
    for i, record in enumerate(depth):
        out.append(f"<p>by <b>{_e(record['criterion'])}</b>: "
                   + ", ".join(f"{_e(n)} ({v:.4f})" for n, v in record["removed"]) + "</p>")
        out.append(_img(plots, f"depth{i}.png" if i else "depth.png", "depth scores"))
    experts = data.get("experts") or []
    if experts:
        out.append(_table(["MoE block", "before", "after", "what"],
                          [(e["block"], e["before"], e["after"], e["what"]) for e in experts]))
    if not depth and not experts:
        out.append("<p class='muted'>no layers or experts were removed</p>")
    allocation = data.get("allocation")
    if allocation:
        out.append("</section><section id='allocation'><h2>Allocation search (Týr)</h2>")
        out.append(f"<p>{len(allocation['rounds'])} rounds, {allocation['evaluations']} evaluations in "
                   f"{allocation['seconds']:.1f} s. Loss against the dense outputs: {allocation['uniform_loss']:.4g} "
                   f"with every group at the uniform ratio, {allocation['measured_loss']:.4g} measured with the "
                   f"chosen ratios ({allocation['estimated_loss']:.4g} estimated).</p>")
        out.append(_table(["group", "ratio"], [(n, f"{v:.1%}") for n, v in allocation["choices"]], numeric=(1,)))
    sparsity = data.get("sparsity")
    if sparsity:
        out.append("</section><section id='sparsity'><h2>Weight sparsity</h2>")
        total = len(sparsity["layers"]) + len(sparsity.get("skipped") or ())
        out.append(f"<p>{_e(sparsity['pattern'])} by {_e(sparsity['criterion'])}: {len(sparsity['layers'])} of "
                   f"{total} linear / conv layers</p>")
        search = sparsity.get("search")
        if search:
            out.append(f"<p>UniPruning search: {search['steps']} feedback steps in {search['seconds']:.2f} s. Loss "
                       f"against the dense outputs: {search['anchor_loss']:.4g} with the anchor's masks alone, "
                       f"{search['measured_loss']:.4g} measured with the chosen masks ({search['estimated_loss']:.4g} "
                       f"estimated to first order); per step: "
                       f"{_e(', '.join(f'{v:.3g}' for v in search['losses']))}</p>")
        out.append(_table(["layer", "zeros"], [(n, f"{v:.1%}") for n, v in sparsity["layers"]], numeric=(1,)))
        if sparsity.get("skipped"):
            out.append("<p>Left dense:</p>" + _table(["layer", "why"], sparsity["skipped"]))
    recovery = data.get("recovery")
    if recovery:
        out.append("</section><section id='recovery'><h2>Recovery training</h2>")
        out.append(f"<p>{_e(recovery['mode'])}, {_e(recovery['objective'])}: {recovery['steps']} steps in "
                   f"{recovery['seconds']:.0f} s, {recovery['trained_params']:,} trained parameters"
                   + (", stopped early" if recovery.get("stopped_early") else "")
                   + (f", weights of step {recovery['best_step']} kept" if recovery.get("best_step") is not None
                      else "") + "</p>")
        out.append(_img(plots, "recovery.png", "recovery loss curve"))
    frozen = data.get("frozen") or []
    out.append(f"</section><section id='frozen'><h2>Frozen groups ({len(frozen)})</h2>")
    out.append("<p class='muted'>Channels the analysis left alone, each with the reason.</p>")
    out.append(_table(["reason", "members", "size"],
                      [(f["reason"], ", ".join(f["members"][:4]) + (" ..." if len(f["members"]) > 4 else ""),
                        f["size"]) for f in frozen], numeric=(2,)) if frozen else "<p>none</p>")
    if data.get("unsupported_ops"):
        out.append("<p>Ops without a rule (their channels are frozen): "
                   + _e(", ".join(data["unsupported_ops"])) + "</p>")
    out.append("</section><section id='recipe'><h2>Recipe and versions</h2>")
    out.append(f"<pre>{_e(json.dumps(data.get('recipe') or data.get('options') or {}, indent=1, default=str))}</pre>")
    out.append(_table(["package", "version"], sorted((data.get("versions") or {}).items())))
    out.append("</section></body></html>")
    return "\n".join(out)


def write_report(folder: str | os.PathLike[str], data: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``report.json``, the PNG plots and ``report.html`` into ``folder``; returns the written paths.

    Raises:
        CheckpointError: A file cannot be written (or matplotlib is missing).

    """
    out = Path(folder)
    written: dict[str, Path] = {}
    try:
        with _atomic(out / "report.json") as f:
            json.dump(data, f, indent=1, default=str)
        written["report.json"] = out / "report.json"
        plain = json.loads(json.dumps(data, default=str))
        plots = _plots(plain)
        for name, png in plots.items():
            written[name] = _write_png(png, out / name)
        with _atomic(out / "report.html") as f:
            f.write(render_html(plain, plots))
        written["report.html"] = out / "report.html"
    except OSError as exc:
        raise CheckpointError(f"cannot write the report into '{out}': {exc}") from exc
    return written
