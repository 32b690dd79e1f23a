"""Pictures of graph diff reports (``GraphDiffReport.to_png`` / ``to_svg``), drawn with networkx on
matplotlib's Agg canvas. One drawing function; the file format comes from the caller.

Compile reports: the FX graph top to bottom, one row per topological generation (networkx's
``multipartite_layout``; nodes in a row ordered by their parents' positions to keep edges short).
Convert reports: the module tree left to right, leaves in registration order.
"""
from __future__ import annotations

import textwrap
from typing import Dict, List, Tuple

import networkx as nx

__all__ = ["draw_report", "picture_graph", "figure_size", "COLORS"]

#: (face, edge) colours of the three kinds of boxes
COLORS = {
    "replaced": ("#c7e9c0", "#238b45"),
    "kept": ("#fdd0a2", "#d94801"),
    "other": ("#f0f0f0", "#969696"),
}
LEGEND = {
    "replaced": "replaced (op before → after, FLOPs, params)",
    "kept": "candidate left as it was (reason)",
    "other": "other op / input / output",
}
MAX_FIGSIZE = (24.0, 32.0)
MIN_FIGSIZE = (6.0, 4.0)


def _contract(G: nx.DiGraph, drop) -> int:
    """Remove the nodes ``drop(name, attrs)`` selects, joining each one's predecessors to its successors."""
    gone = [n for n, a in G.nodes(data=True) if drop(n, a)]
    for n in gone:
        preds, succs = list(G.predecessors(n)), list(G.successors(n))
        G.remove_node(n)
        G.add_edges_from((p, s) for p in preds for s in succs if p != s)
    return len(gone)


def picture_graph(report, max_nodes: int = 80) -> Tuple[nx.DiGraph, str]:
    """The graph that is drawn (a simplified copy of ``report.graph``) and a note on what was left out."""
    if report.graph is None:
        raise ValueError(
            "this report has no graph to draw (reports from the compile backend and panther.convert carry "
            "one; a GraphDiffReport built by hand does not)")
    G = report.graph.copy()
    if G.graph.get("kind") == "modules":
        return G, ""
    hidden = _contract(G, lambda n, a: a.get("role") in ("param", "shape") and "layer" not in a)
    note = f"{hidden} parameter / shape-only nodes not drawn" if hidden else ""
    if G.number_of_nodes() > max_nodes:
        more = _contract(G, lambda n, a: a.get("role") == "op" and "layer" not in a)
        # joined edges now mean "feeds, through other ops": keep only those no longer path implies
        # (without this, a residual stream links every layer to every later one)
        R = nx.transitive_reduction(G)
        R.add_nodes_from(G.nodes(data=True))
        R.graph.update(G.graph)
        G = R
        note = (f"large graph: only inputs, candidate layers and outputs drawn ({hidden + more} other nodes left "
                "out), an arrow = feeds through other ops")
    return G, note


def _fmt(v) -> str:
    from .report import _fmt_int

    return _fmt_int(v)


def _change(before, after) -> str:
    if before is None or after is None or before == 0:
        return f"{_fmt(before)}→{_fmt(after)}"
    return f"{_fmt(before)}→{_fmt(after)} ({after / before - 1:+.0%})"


def _labels(G: nx.DiGraph, report) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Text and kind ("replaced" / "kept" / "other") of every node."""
    rows = {r.name: r for r in report.rows}
    modules = G.graph.get("kind") == "modules"
    text, kind = {}, {}
    for n, a in G.nodes(data=True):
        row = rows.get(a.get("layer"))
        label = a.get("label", str(n))
        if modules:
            label = f"{n.rsplit('.', 1)[-1]} ({label})" if n else label
        if row is None:
            text[n], kind[n] = label, "other"
        elif row.replaced:
            lines = [row.name if not modules else label, f"{row.op_before} → {row.op_after}",
                     f"FLOPs {_change(row.flops_before, row.flops_after)}",
                     f"params {_change(row.params_before, row.params_after)}"]
            text[n], kind[n] = "\n".join(lines), "replaced"
        else:
            reason = textwrap.shorten(row.reason or "left as it was", 80, placeholder="…")
            lines = [row.name if not modules else label, *textwrap.wrap("kept: " + reason, 40)]
            text[n], kind[n] = "\n".join(lines), "kept"
    return text, kind


def _fx_layout(G: nx.DiGraph) -> Tuple[Dict[str, Tuple[float, float]], int, int]:
    """Top-to-bottom layers by topological generation; returns positions, #layers, widest layer."""
    gens = [list(g) for g in nx.topological_generations(G)]
    order = {n: i for i, n in enumerate(G.nodes)}  # graph (execution) order breaks ties
    x: Dict[str, float] = {}
    layers = {}
    for depth, gen in enumerate(gens):
        def key(n):
            px = [x[p] for p in G.predecessors(n) if p in x]
            return (sum(px) / len(px) if px else -1.0, order[n])

        gen.sort(key=key)
        for i, n in enumerate(gen):
            x[n] = i - (len(gen) - 1) / 2
        layers[depth] = gen
    pos = nx.multipartite_layout(G, subset_key=layers, align="horizontal")
    pos = {n: (float(p[0]), -float(p[1])) for n, p in pos.items()}  # first generation on top
    return pos, len(gens), max((len(g) for g in gens), default=1)


def _tree_layout(G: nx.DiGraph) -> Tuple[Dict[str, Tuple[float, float]], int, int]:
    """Module tree left to right: x = depth, leaves stacked in order, a parent centred on its children."""
    roots = [n for n in G if G.in_degree(n) == 0]
    pos: Dict[str, Tuple[float, float]] = {}
    counter = [0]
    depth_max = [0]

    def place(n, depth):
        depth_max[0] = max(depth_max[0], depth)
        kids = list(G.successors(n))
        if not kids:
            y = -float(counter[0])
            counter[0] += 1
        else:
            y = sum(place(k, depth + 1) for k in kids) / len(kids)
        pos[n] = (float(depth), y)
        return y

    for r in roots:
        place(r, 0)
    return pos, depth_max[0] + 1, max(counter[0], 1)


def figure_size(report, max_nodes: int = 80) -> Tuple[float, float]:
    """The automatic figure size (inches) :meth:`GraphDiffReport.to_png` uses for ``report``."""
    G, _ = picture_graph(report, max_nodes)
    return _figsize(G)[0]


def _figsize(G):
    if G.graph.get("kind") == "modules":
        pos, depth, leaves = _tree_layout(G)
        want = (2.6 * depth + 1.0, 0.62 * leaves + 1.6)
    else:
        pos, depth, width = _fx_layout(G)
        want = (2.3 * width + 1.0, 0.78 * depth + 1.6)
    size = tuple(min(max(w, lo), hi) for w, lo, hi in zip(want, MIN_FIGSIZE, MAX_FIGSIZE))
    # shrink the text with the figure when a cap was hit, so that boxes still do not overlap
    shrink = min(1.0, *(s / w for s, w in zip(size, want)))
    return size, pos, shrink


def draw_report(report, path, fmt: str, *, dpi: int = 100, figsize=None, max_nodes: int = 80) -> str:
    """Draw ``report`` (see ``GraphDiffReport.to_png``) to ``path`` in ``fmt`` ("png", "svg", ...)."""
    from matplotlib.patches import Patch

    from ._plot import new_figure, require_matplotlib, save_figure

    require_matplotlib()
    G, note = picture_graph(report, max_nodes)
    auto, pos, shrink = _figsize(G)
    if figsize is not None:
        w, h = figsize
        if w <= 0 or h <= 0:
            raise ValueError(f"figsize must be two positive numbers (inches), got {figsize!r}")
        shrink *= min(1.0, w / auto[0], h / auto[1])
    size = tuple(figsize) if figsize is not None else auto
    fontsize = max(3.0, 7.0 * shrink)
    modules = G.graph.get("kind") == "modules"
    t = report.totals
    where = f"{report.source}{', ' + report.graph_id if report.graph_id else ''}"
    sub = ("module tree of the candidate layers (no FX graph: panther.convert swaps modules)" if modules
           else "FX graph before rewriting, data flows top to bottom")
    title_lines = [f"panther graph diff ({where})",
                   f"{t['replaced']}/{t['layers']} candidate layers replaced; "
                   f"params {_change(t['params_before'], t['params_after'])}, "
                   f"FLOPs {_change(t['flops_before'], t['flops_after'])}",
                   sub + (f"; {note}" if note else "")]
    # header (title, then the legend: one row on wide figures, else three) measured in inches
    title_fs = 9.0 if size[0] >= 8 else 7.5
    per_line = max(20, int(size[0] * 72 / (0.55 * title_fs)) - 4)
    title = "\n".join(part for line in title_lines for part in textwrap.wrap(line, per_line))
    legend_fs = 7.5 if size[0] >= 10 else 6.5
    legend_rows = 1 if size[0] >= 10 else 3
    title_in = 0.1 + (title.count("\n") + 1) * title_fs * 1.3 / 72
    header_in = title_in + 0.05 + legend_rows * legend_fs * 1.7 / 72 + 0.1
    fig = new_figure(size, dpi=dpi)
    ax = fig.add_axes((0.01, 0.01, 0.98, max(0.2, 1 - header_in / size[1] - 0.01)))
    ax.set_axis_off()
    text, kind = _labels(G, report)

    # edges first (under the boxes); edges skipping layers are bent so they do not run through boxes
    step = _layer_step(pos)
    straight, bent = [], []
    for u, v in G.edges:
        span = 0.0 if modules else abs(pos[u][1] - pos[v][1])
        (bent if span > 1.5 * step else straight).append((u, v))
    common = dict(ax=ax, width=0.7, edge_color="#737373")
    if modules:  # a tree reads left to right without arrowheads
        common.update(arrows=False)
    else:
        common.update(arrows=True, arrowstyle="-|>", arrowsize=max(4, 8 * shrink), node_size=(34 * shrink) ** 2 * 1.2,
                      min_source_margin=0, min_target_margin=0)
    if straight:
        nx.draw_networkx_edges(G, pos, edgelist=straight, **common)
    if bent:
        nx.draw_networkx_edges(G, pos, edgelist=bent, connectionstyle="arc3,rad=0.25", style="dashed", **common)
    for k, (face, edge) in COLORS.items():
        nodes = [n for n in G if kind[n] == k]
        if not nodes:
            continue
        labels = nx.draw_networkx_labels(
            G, pos, labels={n: text[n] for n in nodes}, ax=ax, font_size=fontsize,
            bbox=dict(boxstyle="round,pad=0.3", facecolor=face, edgecolor=edge, linewidth=0.8))
        for artist in labels.values():
            artist.set_zorder(3)  # boxes over the edges
    # margins of about one box around the drawing, in the layout's own units
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    xstep = _layer_step({n: (0.0, p[0]) for n, p in pos.items()})
    xpad = 0.5 * (xstep if len(set(xs)) > 1 else 1.0)
    ypad = 0.45 * (step if len(set(ys)) > 1 else 1.0)
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)

    fig.suptitle(title, fontsize=title_fs, y=1 - 0.06 / size[1], va="top")
    legend = dict(LEGEND, other="other module") if modules else LEGEND
    handles: List[Patch] = [Patch(facecolor=COLORS[k][0], edgecolor=COLORS[k][1], label=legend[k]) for k in COLORS]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - title_in / size[1]),
               ncol=3 if legend_rows == 1 else 1, frameon=False, fontsize=legend_fs, borderaxespad=0.0,
               borderpad=0.1, labelspacing=0.25)
    return save_figure(fig, path, fmt)


def _layer_step(pos) -> float:
    ys = sorted({round(p[1], 9) for p in pos.values()})
    steps = [b - a for a, b in zip(ys, ys[1:])]
    return min(steps) if steps else 1.0
