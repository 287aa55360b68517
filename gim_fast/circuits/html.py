"""``circuit.html``: a picture of a circuit run, as one self-contained page (inline SVG, CSS and script; nothing is
loaded, so it opens offline).

- The graph at a chosen edge fraction: nodes by layer (columns: the embedding, each layer's heads and MLP, the
  logits) and head (rows), the circuit's edges drawn with a width by |score| and a colour by sign (green: the edge
  carries the clean behaviour, red: against it). A slider and buttons step through the run's circuit sizes (the
  MIB levels 0.1 % … 100 %); the edges drawn are the circuit's, after pruning, exactly as the faithfulness run
  kept them. Pointing at a node or an edge shows its name and exact score.
- Buttons for the scoring methods of the run.
- The top nodes and edges of the method as tables.
- The faithfulness curve f(k) of every method beside the graph, the chosen size marked.

A page stays small for big models: at most ``MAX_DRAWN`` edges per method are embedded (the highest-ranked); a
circuit size with more edges than that is listed but not drawn (edges.parquet holds every score).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch

from .graph import Graph

__all__ = ["render_circuit_html", "write_circuit_html", "circuit_page_data", "MAX_DRAWN"]

MAX_DRAWN = 3000      # edges embedded per method; bigger circuits are listed, not drawn
TOP_ROWS = 20         # rows of the top nodes and top edges tables


def _anchor(graph: Graph, i: int) -> list:
    """Where input ``i`` is drawn: [column, row] (column 0 the embedding, l + 1 layer l, layers + 1 the logits;
    rows: heads 0 … H−1, the MLP at H; a key/value input at the middle of its group's heads)."""
    if i == graph.logits_input:
        return [graph.layers + 1, graph.heads / 2]
    layer, k = divmod(i, graph.inputs_per_layer)
    group = graph.heads // graph.kv_heads
    if k < graph.heads:                                  # query input of head k
        return [layer + 1, k]
    if k < graph.heads + 2 * graph.kv_heads:             # key or value input of kv group g
        g = (k - graph.heads) % graph.kv_heads
        return [layer + 1, g * group + (group - 1) / 2]
    return [layer + 1, graph.heads]                       # the MLP


def _node_place(graph: Graph, n: int) -> list:
    if n == 0:
        return [0, graph.heads / 2]
    layer, k = divmod(n - 1, graph.heads + 1)
    return [layer + 1, k]


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else 0.0


def circuit_page_data(result, *, max_drawn: int | None = None) -> dict:
    """Everything the page draws, as plain JSON-able values (see the module docstring); ``max_drawn``: edges
    embedded per method (default :data:`MAX_DRAWN`)."""
    max_drawn = MAX_DRAWN if max_drawn is None else max_drawn
    graph = result.graph
    curves = result.faithfulness.curves
    edge_curves = [c for c in curves if c.level == "edge"]
    ranking = (edge_curves or curves)[0].ranking if curves else "signed"
    percentages = list((edge_curves or curves)[0].percentages) if curves else []
    index = graph.edge_index()
    methods = {}
    for name, scores in result.scores.items():
        values = scores.edge_values().float()
        key = values.abs() if ranking == "absolute" else values
        order = torch.argsort(-key, stable=True)[:max_drawn]
        drawn = index[order]
        position = {(int(s), int(i)): k for k, (s, i) in enumerate(drawn.tolist())}
        levels = []
        for p in percentages:
            count = int(p / 100 * graph.n_edges)
            if count > len(order):
                levels.append(None)                       # too many edges to draw
                continue
            circuit = graph.top_edges(scores.edges, count, absolute=ranking == "absolute", prune=True)
            kept = sorted(position[(int(s), int(i))] for s, i in circuit.nonzero().tolist())
            levels.append(kept)
        nodes = scores.nodes.float()
        top_nodes = torch.argsort(-nodes.abs(), stable=True)[:TOP_ROWS].tolist()
        methods[name] = {
            "edges": [[int(s), int(i), _round(float(v))] for (s, i), v in zip(drawn.tolist(), values[order].tolist())],
            "levels": levels, "node_scores": [_round(float(v)) for v in nodes.tolist()],
            "top_nodes": top_nodes, "seconds": _round(float(scores.seconds))}
    return {
        "model": result.model, "task": result.task.name, "examples": len(result.task), "graph": str(graph),
        "layers": graph.layers, "heads": graph.heads, "kv_heads": graph.kv_heads, "n_edges": graph.n_edges,
        "nodes": list(graph.sources), "inputs": list(graph.inputs),
        "node_places": [_node_place(graph, n) for n in range(graph.n_sources)],
        "input_anchors": [_anchor(graph, i) for i in range(graph.n_inputs)],
        "percentages": percentages, "ranking": ranking, "max_drawn": max_drawn, "methods": methods,
        "curves": [{"method": c.method, "level": c.level, "ranking": c.ranking, "percent": list(c.percentages),
                    "f": [_round(v) for v in c.faithfulness], "cpr": _round(c.cpr), "cmd": _round(c.cmd)}
                   for c in curves],
        "metric": result.task.metric.describe(),
        "full_metric": _round(result.faithfulness.full_metric),
        "empty_metric": _round(result.faithfulness.empty_metric),
    }


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 0.2em 0; }
p.legend { color: #555; font-size: 0.9em; margin: 0.2em 0 0.6em 0; }
.controls { display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; align-items: center; margin: 0.5em 0; font-size: 0.9em; }
.controls button { font: inherit; padding: 2px 8px; border: 1px solid #aaa; border-radius: 4px; background: #f6f6f6;
                   cursor: pointer; }
.controls button.on { background: #333; color: #fff; border-color: #333; }
.controls button:disabled { color: #aaa; cursor: not-allowed; }
#fraction { width: 18em; }
.panels { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
svg { background: #fcfcfc; border: 1px solid #ddd; border-radius: 6px; }
.node { fill: #ddd; stroke: #999; stroke-width: 0.5; }
.node.on { fill: #4a6fa5; stroke: #223; }
.node:hover, .edge:hover { stroke: #000; stroke-width: 2; }
.edge { fill: none; stroke-linecap: round; }
.axis { stroke: #999; stroke-width: 1; }
.lab { font-size: 10px; fill: #666; }
#info { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; min-height: 1.4em; color: #222;
        background: #f4f4f4; padding: 3px 6px; border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.85em; margin-top: 0.3em; }
th, td { border: 1px solid #e4e4e4; padding: 2px 6px; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
.tables { display: flex; flex-wrap: wrap; gap: 2em; margin-top: 1em; }
"""

_SCRIPT = r"""
(function () {
  const D = JSON.parse(document.getElementById("circuit-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const methods = Object.keys(D.methods);
  let method = methods[0];
  let level = 0;
  const graph = document.getElementById("graph"), edgeLayer = document.getElementById("edges"),
        nodeLayer = document.getElementById("nodes"), info = document.getElementById("info"),
        slider = document.getElementById("fraction"), sizeText = document.getElementById("size");
  const W = +graph.getAttribute("width"), H = +graph.getAttribute("height"), PAD = 28;
  const cols = D.layers + 2, rows = D.heads + 1;
  const X = c => PAD + c * (W - 2 * PAD) / (cols - 1);
  const Y = r => PAD + r * (H - 2 * PAD) / (rows - 1);
  const fmt = v => (v >= 0 ? "+" : "") + Number(v).toPrecision(6);
  const esc = t => String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function say(text) { info.textContent = text; }
  // nodes: drawn once; the circuit's are filled
  const circles = D.nodes.map((name, n) => {
    const [c, r] = D.node_places[n];
    const dot = el("circle", {cx: X(c), cy: Y(r), r: 4, class: "node", "data-node": name}, nodeLayer);
    dot.addEventListener("mouseenter", () => say(name + ": node score " + fmt(D.methods[method].node_scores[n]) +
                                                 " (" + method + ")"));
    return dot;
  });
  const logits = el("rect", {x: X(cols - 1) - 5, y: Y(D.heads / 2) - 5, width: 10, height: 10, class: "node on",
                             "data-node": "logits"}, nodeLayer);
  logits.addEventListener("mouseenter", () => say("logits: the metric " + D.metric + " is read here"));
  for (let l = 0; l < D.layers; l += Math.max(1, Math.ceil(D.layers / 16)))
    el("text", {x: X(l + 1), y: H - 8, class: "lab", "text-anchor": "middle"}, graph).textContent = "L" + l;
  el("text", {x: X(0), y: H - 8, class: "lab", "text-anchor": "middle"}, graph).textContent = "emb";
  function redraw() {
    const m = D.methods[method], kept = m.levels[level];
    while (edgeLayer.firstChild) edgeLayer.removeChild(edgeLayer.firstChild);
    const on = new Set();
    const p = D.percentages[level];
    if (kept === null) {
      sizeText.textContent = p + "% of " + D.n_edges.toLocaleString("en-US") + " edges: more than the " + D.max_drawn +
                             " this page holds (see edges.parquet)";
    } else {
      let peak = 0;
      for (const k of kept) peak = Math.max(peak, Math.abs(m.edges[k][2]));
      for (const k of kept) {
        const [s, i, v] = m.edges[k];
        const [c0, r0] = D.node_places[s], [c1, r1] = D.input_anchors[i];
        const x0 = X(c0), y0 = Y(r0), x1 = X(c1), y1 = Y(r1), mid = (x0 + x1) / 2;
        const path = el("path", {d: `M${x0},${y0} C${mid},${y0} ${mid},${y1} ${x1},${y1}`, class: "edge",
                                 stroke: v >= 0 ? "rgb(22,163,74)" : "rgb(220,38,38)",
                                 "stroke-opacity": 0.65,
                                 "stroke-width": 0.6 + 3.4 * (peak > 0 ? Math.abs(v) / peak : 0),
                                 "data-edge": D.nodes[s] + "->" + D.inputs[i]}, edgeLayer);
        const name = D.nodes[s] + "->" + D.inputs[i];
        path.addEventListener("mouseenter", () => say(name + ": edge score " + fmt(v) + " (" + method + ")"));
        on.add(s);
        const owner = D.inputs[i].split("<")[0];
        const n = D.nodes.indexOf(owner);
        if (n >= 0) on.add(n);
      }
      sizeText.textContent = p + "% of " + D.n_edges.toLocaleString("en-US") + " edges: " + kept.length +
                             " kept after pruning, " +
                             on.size + " nodes";
    }
    circles.forEach((dot, n) => dot.classList.toggle("on", on.has(n)));
    graph.setAttribute("data-edges", kept === null ? -1 : kept.length);
    document.querySelectorAll("#levels button").forEach((b, k) => {
      b.classList.toggle("on", k === level);
      b.disabled = m.levels[k] === null;
    });
    document.querySelectorAll("#methods button").forEach(b => b.classList.toggle("on", b.dataset.method === method));
    drawCurve();
    tables();
  }
  // the faithfulness curves of the edge level (else the first level), the chosen method bold, the size marked
  function drawCurve() {
    const svg = document.getElementById("curve");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const w = +svg.getAttribute("width"), h = +svg.getAttribute("height"), L = 40, R = 10, T = 12, B = 30;
    const levelName = D.curves.some(c => c.level === "edge") ? "edge" : (D.curves[0] || {}).level;
    const shown = D.curves.filter(c => c.level === levelName && c.ranking === D.ranking);
    if (!shown.length) return;
    const xs = shown[0].percent.map(p => Math.log10(p));
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    let lo = 0, hi = 1;
    for (const c of shown) for (const f of c.f) { lo = Math.min(lo, f); hi = Math.max(hi, f); }
    const px = p => L + (x1 > x0 ? (Math.log10(p) - x0) / (x1 - x0) : 0.5) * (w - L - R);
    const py = f => T + (hi - f) / (hi - lo || 1) * (h - T - B);
    el("line", {x1: L, x2: w - R, y1: py(0), y2: py(0), class: "axis"}, svg);
    el("line", {x1: L, x2: w - R, y1: py(1), y2: py(1), class: "axis", "stroke-dasharray": "4 3"}, svg);
    el("text", {x: 4, y: py(1) + 4, class: "lab"}, svg).textContent = "f=1";
    el("text", {x: 4, y: py(0) + 4, class: "lab"}, svg).textContent = "f=0";
    el("text", {x: w / 2, y: h - 6, class: "lab", "text-anchor": "middle"}, svg).textContent =
      levelName + "s kept (%, log scale); " + D.ranking + " ranking";
    const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];
    shown.forEach((c, k) => {
      const pts = c.percent.map((p, j) => px(p) + "," + py(c.f[j])).join(" ");
      const line = el("polyline", {points: pts, fill: "none", stroke: palette[k % palette.length],
                                   "stroke-width": c.method === method ? 3 : 1.2, "data-method": c.method}, svg);
      line.addEventListener("mouseenter", () => say(c.method + " (" + c.level + "s): CPR " + c.cpr + ", CMD " + c.cmd));
      el("text", {x: L + 6, y: T + 12 * (k + 1), class: "lab", fill: palette[k % palette.length]}, svg)
        .textContent = c.method + ": CPR " + Number(c.cpr).toFixed(3) + ", CMD " + Number(c.cmd).toFixed(3);
      if (c.method === method) {
        const j = c.percent.indexOf(D.percentages[level]);
        if (j >= 0) {
          const dot = el("circle", {cx: px(c.percent[j]), cy: py(c.f[j]), r: 5, fill: "#000", id: "marker"}, svg);
          dot.addEventListener("mouseenter", () => say(c.method + " at " + c.percent[j] + "%: f = " + c.f[j]));
        }
      }
    });
  }
  function tables() {
    const m = D.methods[method];
    const nodes = m.top_nodes.map(n =>
      `<tr><td>${esc(D.nodes[n])}</td><td class="num">${fmt(m.node_scores[n])}</td></tr>`);
    document.getElementById("top-nodes").innerHTML = "<tr><th>node</th><th>score</th></tr>" + nodes.join("");
    const edges = m.edges.slice(0, 20).map(([s, i, v]) =>
      `<tr><td>${esc(D.nodes[s] + "->" + D.inputs[i])}</td><td class="num">${fmt(v)}</td></tr>`);
    document.getElementById("top-edges").innerHTML = "<tr><th>edge</th><th>score</th></tr>" + edges.join("");
    document.getElementById("tables-method").textContent = method;
  }
  const levelBox = document.getElementById("levels");
  D.percentages.forEach((p, k) => {
    const b = document.createElement("button");
    b.textContent = p + "%";
    b.addEventListener("click", () => { level = k; slider.value = k; redraw(); });
    levelBox.appendChild(b);
  });
  const methodBox = document.getElementById("methods");
  methods.forEach(name => {
    const b = document.createElement("button");
    b.textContent = name;
    b.dataset.method = name;
    b.addEventListener("click", () => { method = name; redraw(); });
    methodBox.appendChild(b);
  });
  slider.max = D.percentages.length - 1;
  // start at the largest size that can be drawn and is at most 1 %
  level = 0;
  D.percentages.forEach((p, k) => { if (p <= 1 && D.methods[method].levels[k] !== null) level = k; });
  slider.value = level;
  slider.addEventListener("input", () => { level = +slider.value; redraw(); });
  redraw();
})();
"""


def render_circuit_html(result, *, title: str | None = None, max_drawn: int | None = None) -> str:
    """The page of a ``CircuitResult`` (see the module docstring) as a string."""
    data = circuit_page_data(result, max_drawn=max_drawn)
    title = title or f"Circuit: {result.model}, {result.task.name}"
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    width = max(600, min(980, 60 + 34 * (data["layers"] + 2)))
    height = max(260, min(700, 60 + 26 * (data["heads"] + 1)))
    p = result.performance
    summary = (f"{data['examples']} examples; clean accuracy {p.accuracy:.0%}; metric {html.escape(data['metric'])}: "
               f"{p.clean_metric:.3f} clean vs {p.corrupt_metric:.3f} corrupt; {html.escape(data['graph'])}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="legend">{summary}</p>
<p class="legend">Columns: the embedding, each layer (its heads from the top, its MLP at the bottom), the logits. The
circuit of the chosen size is drawn: filled nodes and its edges, green where the edge carries the clean behaviour
(positive score), red where it works against it; width by |score|. Point at a node, an edge or a curve for its name
and exact score.</p>
<div class="controls"><span>method:</span><span id="methods"></span></div>
<div class="controls"><span>edges kept:</span><input type="range" id="fraction" min="0" max="0" step="1" value="0"/>
<span id="levels"></span></div>
<div class="controls"><span id="size"></span></div>
<div id="info">point at a node or an edge</div>
<div class="panels">
<svg id="graph" width="{width}" height="{height}" role="img" aria-label="the circuit graph">
<g id="edges"></g><g id="nodes"></g></svg>
<svg id="curve" width="360" height="{height}" role="img" aria-label="faithfulness curves"></svg>
</div>
<div class="tables">
<div><b>Top nodes</b> (<span id="tables-method"></span>, by |score|)<table id="top-nodes"></table></div>
<div><b>Top edges</b> (by the {html.escape(data['ranking'])} ranking)<table id="top-edges"></table></div>
</div>
<script type="application/json" id="circuit-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_circuit_html(result, path, **kwargs) -> Path:
    """Write :func:`render_circuit_html` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_circuit_html(result, **kwargs), encoding="utf-8")
    return path
