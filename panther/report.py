"""Graph diff reports: what panther replaced, what it left alone and why (plain data).

Both the compile backend and ``panther.convert`` produce a :class:`GraphDiffReport`; the most recent one is
kept for :func:`last_report`. ``str(report)`` is a table (tabulate), ``report.to_markdown()`` a GitHub
table, ``report.as_dict()`` plain dicts and numbers for asserting in tests or dumping as JSON, and
``report.to_png(path)`` / ``report.to_svg(path)`` a picture of the graph with the replaced layers marked
(needs matplotlib: ``pip install 'panther[plot]'``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["ReportRow", "GraphDiffReport", "last_report"]



def module_of(row_name: str) -> str:
    """The module path of a row's layer: a module called several times in one graph has rows ``fc``, ``fc#1``..."""
    return row_name.split("#", 1)[0]

@dataclass
class ReportRow:
    """One candidate layer (graph node or module).

    ``op_before``/``op_after`` name the op (or module class) before and after; they are equal when the
    layer was left alone, and then ``reason`` says why (on a replaced row it notes a side effect, e.g. a
    broken weight tie). ``params_*`` count tensor elements the layer needs
    (weights, factors, fixed sketches, bias, random features); ``flops_*`` are FLOPs of one call at the
    traced shapes (``None`` when unknown). ``est_error`` is the relative Frobenius error of the sketched
    weight ‖W − Ŵ‖/‖W‖ where it is cheap to know (linear / conv2d), and for attention that of its output
    on a sample of the example input (compile reports, where the graph could be run; shown in the note),
    else ``None``.
    """

    name: str
    kind: str
    op_before: str
    op_after: str
    replaced: bool
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    spec: Any = None
    est_error: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        """The row as plain data (the spec as a dict, a calibration Gram matrix as its shape)."""
        d = dataclasses.asdict(self)
        d["spec"] = None if self.spec is None else dataclasses.asdict(self.spec)
        if d["spec"] is not None and d["spec"].get("act_gram") is not None:
            d["spec"]["act_gram"] = "calibration Gram " + "x".join(map(str, self.spec.act_gram.shape))
        return d


def _fmt_int(v):
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


def _sum(values):
    vals = [v for v in values]
    if any(v is None for v in vals):
        return None
    return sum(vals)


def warn_inaccurate_attention(rows, where: str):
    """Log a warning naming the rewritten attention layers whose measured output error exceeds the default
    policy's limit: an explicit policy asked for them, and a user who does not read the report should know."""
    from .policy import DEFAULT_MAX_ATTENTION_ERROR

    bad = [f"{r.name} ({r.est_error:.3g})" for r in rows
           if r.kind == "attention" and r.replaced and r.est_error is not None and r.est_error > DEFAULT_MAX_ATTENTION_ERROR]
    if bad:
        logging.getLogger("panther").warning(
            "%s: random-feature attention misses exact attention by more than %s (relative output error on the "
            "example input) in %s; the policy asked for it. Exact attention there, or more features, would be "
            "more accurate (see the report).", where, DEFAULT_MAX_ATTENTION_ERROR, ", ".join(bad))


def _output_error(row) -> str:
    return f"output err {row.est_error:.3g} on the example" if row.kind == "attention" and row.est_error is not None else ""


@dataclass
class GraphDiffReport:
    """Rows in graph (execution) order plus totals; ``source`` is ``"compile"`` or ``"convert"``.

    ``graph`` is what :meth:`to_png` draws: a ``networkx.DiGraph`` of plain strings (no tensors or
    modules), for compile reports the FX graph as it was *before* panther rewrote it (node ``label``,
    ``role``, and ``layer`` = the row name on candidate nodes; see ``fx_passes.graph_view``), for
    ``panther.convert`` reports the module tree of the candidate layers and their parent modules.
    It is ``None`` for reports built by hand; it is left out of :meth:`as_dict`, ``==`` and ``repr``.

    ``graph_break`` says where and why Dynamo ended a compile report's graph at a graph break (``None`` when
    the graph ends where its frame returns): the code after the break is another graph, with a report of its
    own, or runs uncompiled, in no report.
    """

    rows: List[ReportRow] = field(default_factory=list)
    source: str = "compile"
    graph_id: Optional[str] = None
    graph: Any = field(default=None, repr=False, compare=False)
    graph_break: Optional[str] = None

    # -- queries -------------------------------------------------------------------------------------
    @property
    def replaced(self) -> List[ReportRow]:
        """The rows of the layers that were replaced."""
        return [r for r in self.rows if r.replaced]

    @property
    def skipped(self) -> List[ReportRow]:
        """The rows of the layers left alone (each with its ``reason``)."""
        return [r for r in self.rows if not r.replaced]

    def row(self, name: str) -> ReportRow:
        """The row of layer ``name`` (KeyError listing the names if absent)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    @property
    def totals(self) -> Dict[str, Optional[int]]:
        """Sums over all rows (a FLOP total is ``None`` when some row's FLOPs are unknown). A layer called
        several times (rows ``fc``, ``fc#1``...) holds its weights once, and its calls share their
        factors, so its parameters count once per distinct outcome (kept dense / replaced)."""
        before, after = {}, {}
        for r in self.rows:
            base = module_of(r.name)
            before[base] = r.params_before
            after[(base, r.replaced)] = r.params_after
        return {
            "layers": len(self.rows),
            "replaced": len(self.replaced),
            "params_before": sum(before.values()),
            "params_after": sum(after.values()),
            "flops_before": _sum(r.flops_before for r in self.rows),
            "flops_after": _sum(r.flops_after for r in self.rows),
        }

    # -- renderings ----------------------------------------------------------------------------------
    _HEADERS = ("layer", "kind", "before", "after", "params", "FLOPs", "weight err", "note")

    def _table_rows(self):
        out = []
        for r in self.rows:
            out.append(
                (
                    r.name,
                    r.kind,
                    r.op_before,
                    r.op_after if r.replaced else "(unchanged)",
                    f"{_fmt_int(r.params_before)} -> {_fmt_int(r.params_after)}",
                    f"{_fmt_int(r.flops_before)} -> {_fmt_int(r.flops_after)}",
                    "-" if r.est_error is None or r.kind == "attention" else f"{r.est_error:.3g}",
                    "; ".join(filter(None, (_spec_str(r.spec, r.kind), _output_error(r), r.reason))) if r.replaced else r.reason,
                )
            )
        t = self.totals
        out.append(
            (
                "TOTAL",
                "",
                "",
                f"{t['replaced']}/{t['layers']} replaced",
                f"{_fmt_int(t['params_before'])} -> {_fmt_int(t['params_after'])}",
                f"{_fmt_int(t['flops_before'])} -> {_fmt_int(t['flops_after'])}",
                "",
                "",
            )
        )
        return out

    def __str__(self) -> str:
        from tabulate import tabulate

        title = f"panther graph diff ({self.source}{', ' + self.graph_id if self.graph_id else ''})"
        table = title + "\n" + tabulate(self._table_rows(), headers=self._HEADERS, tablefmt="simple")
        return table + (f"\ngraph break: {self.graph_break}" if self.graph_break else "")

    def to_markdown(self) -> str:
        """The table of ``str(report)`` as a GitHub Markdown table (no title line)."""
        from tabulate import tabulate

        return tabulate(self._table_rows(), headers=self._HEADERS, tablefmt="github")

    def to_png(self, path, *, dpi: int = 100, figsize=None, max_nodes: int = 80) -> str:
        """Draw the graph this report describes to a PNG file at ``path``; return the path.

        Replaced layers are green boxes labelled with their op before -> after and the FLOP and
        parameter change; candidates left as they were are orange with the reason; every other node is
        grey. Compile reports draw the FX graph top to bottom in topological layers, with module
        parameters, symbolic sizes and shape-only ops (getitem, view, transpose...) left out (their edges
        are joined through); when more than ``max_nodes`` nodes remain, only the inputs, the candidate
        layers and the output are drawn (the title says so). ``panther.convert`` reports, which have no
        FX graph, draw the module tree of their candidate layers, left to right.

        The picture is ``figsize`` (inches, width x height; default: grown with the graph, capped at
        24 x 32) times ``dpi`` pixels. Raises ValueError for a report without a graph (built by hand)
        and ImportError naming ``pip install 'panther[plot]'`` when matplotlib is missing.
        """
        from ._report_plot import draw_report

        return draw_report(self, path, "png", dpi=dpi, figsize=figsize, max_nodes=max_nodes)

    def to_svg(self, path, *, figsize=None, max_nodes: int = 80) -> str:
        """The picture of :meth:`to_png` as an SVG file (scalable: zoom into large graphs); return the path."""
        from ._report_plot import draw_report

        return draw_report(self, path, "svg", dpi=100, figsize=figsize, max_nodes=max_nodes)

    def as_dict(self) -> Dict[str, Any]:
        """Plain dicts and numbers (JSON-ready): ``source``, ``graph_id``, ``graph_break``, ``rows`` and ``totals``."""
        return {
            "source": self.source,
            "graph_id": self.graph_id,
            "graph_break": self.graph_break,
            "rows": [r.as_dict() for r in self.rows],
            "totals": self.totals,
        }


def _spec_str(spec, kind: str) -> str:
    """The spec's fields that count for a layer of ``kind`` (attention takes m and the kernel only)."""
    if spec is None:
        return ""
    if kind == "attention":
        text = f"m={spec.num_random_features}, {spec.kernel_fn}"
    else:
        act = "+act" if getattr(spec, "act_gram", None) is not None else ""
        text = f"L={spec.num_terms}, k={spec.low_rank}, {spec.init}{act}"
    note = getattr(spec, "note", "")
    return f"{text}; {note}" if note else text


_LAST: Optional[GraphDiffReport] = None


def last_report() -> Optional[GraphDiffReport]:
    """The report of the most recent panther compile (one per graph Dynamo hands the backend) or
    ``panther.convert`` call in this process; ``None`` before the first."""
    return _LAST


def _set_last(report: GraphDiffReport) -> None:
    global _LAST
    _LAST = report
