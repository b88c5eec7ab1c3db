"""`chuxin-ray report RUN_URI`: one page on what a run did, from the files its stages left.

    <run>/<stage>/_manifest.json      status, duration, counts: the stage table and the data funnel
    <run>/<stage>/metrics.jsonl       pretrain, finetune, unified: loss curves, one line per step
    <run>/score/data/*.jsonl          pos_scores / neg_scores: the reranker's score distributions
    <run>/evaluate/results.json       set -> model -> method -> {metric: value}: model vs baseline
      -> <run>/report/report.md       the numbers, as Markdown tables
      -> <run>/report/report.html     the same tables and the charts, one self-contained file

Only `<run>/<stage>/` is read: a stage whose `output` key points elsewhere shows as not run. A stage
that is absent, unfinished or of an unknown shape is shown as such; nothing here raises on a run's
content. Charts are SVG drawn here (matplotlib is not a dependency), inlined as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chuxin_ray import storage
from chuxin_ray.config import STAGES, StorageConfig

log = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "finetune", "unified")
SCORE_SAMPLE_ROWS = 20_000  # score rows read for the histograms; ~100 bytes of scores each
SCORE_READ_CHUNK = 1 << 20
CHART_POINTS = 1_000  # loss points drawn per series; longer runs are thinned evenly

# Per stage: where the rows entering and leaving it are counted (dotted paths into `counts`), and which
# counts say what happened to them. A dict-valued count is shown as its total with the breakdown.
ROWS: dict[str, tuple[str | None, str | None]] = {
    "ingest": ("read", "kept"),
    "tokenize": ("texts", "rows"),
    "pretrain": ("samples", None),
    "synthesize": ("funnel.passages_in", "funnel.queries_generated"),
    "judge": ("funnel.queries_judge_in", "funnel.queries_kept"),
    "mine": ("funnel.queries_mined", "funnel.queries_mined"),
    "score": ("funnel.queries_score_in", "funnel.queries_out"),
    "finetune": ("samples", None),
    "unified": ("samples", None),
}
OUTCOMES: dict[str, tuple[str, ...]] = {
    "ingest": ("dropped", "duplicates", "quarantined"),
    "tokenize": ("over_max_length", "tokens"),
    "pretrain": ("steps", "sessions", "tokens", "final_loss"),
    "synthesize": (
        "funnel.passages_with_queries",
        "funnel.unparsed_answers",
        "funnel.failed_calls",
        "requests",
        "prompt_tokens",
        "completion_tokens",
    ),
    "judge": ("funnel.rule_filtered", "funnel.judged_out", "funnel.judge_failed_calls", "requests"),
    "mine": (
        "funnel.negatives_mined",
        "funnel.negatives_random_fill",
        "funnel.queries_short_of_negatives",
        "funnel.corpus_passages",
    ),
    "score": ("funnel.pairs_scored", "funnel.pairs_out", "funnel.pairs_dropped", "funnel.queries_dropped"),
}
FUNNEL: tuple[tuple[str, str, str], ...] = (  # (stage, count, what it counts), from raw text to pairs
    ("ingest", "read", "records read"),
    ("ingest", "dropped", "dropped by cleaning rules"),
    ("ingest", "duplicates", "exact duplicates"),
    ("ingest", "quarantined", "quarantined (bad input)"),
    ("ingest", "kept", "passages kept"),
    ("synthesize", "funnel.passages_in", "passages sent to the LLM"),
    ("synthesize", "funnel.queries_generated", "queries generated"),
    ("judge", "funnel.queries_kept", "queries kept by the judge"),
    ("mine", "funnel.queries_mined", "queries with mined negatives"),
    ("mine", "funnel.negatives_mined", "hard negatives mined"),
    ("score", "funnel.queries_out", "training queries kept by the reranker"),
    ("score", "funnel.pairs_out", "training pairs kept by the reranker"),
)
FUNNEL_CHART = ("read", "kept", "funnel.passages_in", "funnel.queries_generated", "funnel.queries_kept")
EVAL_METRICS = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_10")
NOT_RUN = "not run"


# --------------------------------------------------------------------------------------------------
# Collecting: files -> plain data
# --------------------------------------------------------------------------------------------------


@dataclass
class StageRow:
    stage: str
    status: str  # complete | incomplete | not run
    duration_s: float | None = None
    rows_in: Any = None
    rows_out: Any = None
    outcomes: list[tuple[str, Any, dict]] = field(default_factory=list)  # (name, total, breakdown)


@dataclass
class RunReport:
    uri: str
    generated_at: str
    stages: list[StageRow]
    funnel: list[tuple[str, str, Any]]  # (stage, label, count or None)
    losses: dict[str, list[dict]]  # training stage -> metrics lines
    scores: dict | None  # {"pos": [...], "neg": [...], "rows": n, "rows_total": n, "files": k, ...}
    evaluation: Any  # results.json as parsed, None when absent
    problems: list[str]  # files found but not understood: shown, never raised


def lookup(counts: dict, path: str | None) -> Any:
    """counts["a"]["b"] for "a.b"; None when a part is missing."""
    if not path:
        return None
    node: Any = counts
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _total(value: Any) -> Any:
    return sum(v for v in value.values() if isinstance(v, int | float)) if isinstance(value, dict) else value


def _outcomes(stage: str, counts: dict) -> list[tuple[str, Any, dict]]:
    paths = OUTCOMES.get(stage)
    found = [(p, lookup(counts, p)) for p in paths or ()]
    found = [(p, v) for p, v in found if v is not None]
    if not found:  # a stage not described above, or a changed manifest: every count it has
        skip = set(ROWS.get(stage, ()))
        found = [(k, v) for k, v in counts.items() if k not in skip and isinstance(v, int | float | dict)]
    return [
        (path.rsplit(".", 1)[-1], _total(v), v if isinstance(v, dict) else {})
        for path, v in found
        if not isinstance(v, dict) or all(isinstance(x, int | float) for x in v.values())
    ]


def collect(run: storage.Location) -> RunReport:
    """Everything the report shows, read from the run's folder. Missing pieces stay None."""
    problems: list[str] = []
    rows = []
    manifests: dict[str, dict] = {}
    for stage in STAGES:
        out = run.child(stage)
        raw = _read_json(out.child(storage.MANIFEST), problems)
        if isinstance(raw, dict) and raw.get("status") == "complete":
            manifests[stage] = raw
            counts = raw.get("counts") if isinstance(raw.get("counts"), dict) else {}
            in_key, out_key = ROWS.get(stage, (None, None))
            rows.append(
                StageRow(
                    stage,
                    "complete",
                    raw["duration_s"] if isinstance(raw.get("duration_s"), int | float) else None,
                    lookup(counts, in_key),
                    lookup(counts, out_key),
                    _outcomes(stage, counts),
                )
            )
        elif raw is not None or _exists(out):
            rows.append(StageRow(stage, "incomplete"))  # started; no complete manifest yet
        else:
            rows.append(StageRow(stage, NOT_RUN))
    funnel = [
        (
            stage,
            label,
            _total(lookup(manifests[stage].get("counts", {}), path)) if stage in manifests else None,
        )
        for stage, path, label in FUNNEL
    ]
    losses = {}
    for stage in TRAINING_STAGES:
        lines = _read_metrics(run.child(stage, "metrics.jsonl"), problems)
        if lines:
            losses[stage] = lines
    return RunReport(
        uri=run.uri,
        generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        stages=rows,
        funnel=funnel,
        losses=losses,
        scores=_sample_scores(run.child("score"), manifests.get("score"), problems),
        evaluation=_read_json(run.child("evaluate", "results.json"), problems),
        problems=problems,
    )


def _exists(loc: storage.Location) -> bool:
    try:
        return storage.exists(loc)
    except OSError:
        return False


def _read_json(loc: storage.Location, problems: list[str]) -> Any:
    if not _exists(loc):
        return None
    try:
        return json.loads(storage.read_bytes(loc))
    except (OSError, ValueError) as e:
        problems.append(f"{loc.uri}: not readable as JSON ({e})")
        return None


def _read_metrics(loc: storage.Location, problems: list[str]) -> list[dict]:
    if not _exists(loc):
        return []
    lines = []
    for i, line in enumerate(storage.read_bytes(loc).decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"{loc.uri}: line {i} is not JSON; skipped")
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            lines.append(record)
    return sorted(lines, key=lambda r: r["step"])


def _sample_scores(out: storage.Location, manifest: dict | None, problems: list[str]) -> dict | None:
    """pos_scores / neg_scores of up to SCORE_SAMPLE_ROWS rows: whole files in a seeded random order,
    each read only as far as the sample needs (a file can be GBs)."""
    if manifest is None:
        return None
    listed = (manifest.get("files") or {}).get("data") or []
    paths = [f["path"] for f in listed if isinstance(f, dict) and "path" in f]
    random.Random(0).shuffle(paths)
    pos: list[float] = []
    neg: list[float] = []
    rows = files = 0
    for rel in paths:
        if rows >= SCORE_SAMPLE_ROWS:
            break
        files += 1
        for line in _lines(out.child(rel), SCORE_SAMPLE_ROWS - rows, problems):
            try:
                record = json.loads(line)
                pos_s = [float(s) for s in record.get("pos_scores") or ()]
                neg_s = [float(s) for s in record.get("neg_scores") or ()]
            except (ValueError, TypeError, AttributeError):  # not a row of score's shape: not counted
                continue
            pos += pos_s
            neg += neg_s
            rows += 1
    config = manifest.get("config") or {}
    return {
        "pos": pos,
        "neg": neg,
        "rows": rows,
        "rows_total": sum(f.get("rows") or 0 for f in listed if isinstance(f, dict)),
        "files": files,
        "files_total": len(paths),
        "pos_threshold": config.get("pos_threshold"),
        "neg_threshold": config.get("neg_threshold"),
        "mode": config.get("mode"),
    }


def _lines(loc: storage.Location, limit: int, problems: list[str]):
    """Up to `limit` non-empty lines of a text file, read in 1 MiB chunks."""
    try:
        stream = loc.fs.open_input_stream(loc.path)
    except OSError as e:
        problems.append(f"{loc.uri}: cannot be read ({e})")
        return
    with stream:
        rest = b""
        while limit > 0:
            try:
                chunk = stream.read(SCORE_READ_CHUNK)
            except OSError as e:
                problems.append(f"{loc.uri}: read failed ({e}); the sample stops there")
                return
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop() if chunk else b""
            for part in parts:
                if part.strip() and limit > 0:
                    limit -= 1
                    yield part.decode("utf-8", "replace")
            if not chunk:
                return


# --------------------------------------------------------------------------------------------------
# Numbers -> tables (shared by Markdown and HTML)
# --------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def outcome_text(outcomes: list[tuple[str, Any, dict]]) -> str:
    parts = []
    for name, total, breakdown in outcomes:
        detail = ", ".join(f"{k}: {fmt(v)}" for k, v in breakdown.items() if v)
        parts.append(f"{name}: {fmt(total)}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def stage_table(report: RunReport) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "status", "duration", "rows in", "rows out", "outcomes"]
    body = [
        [
            s.stage,
            s.status,
            fmt_duration(s.duration_s),
            fmt(s.rows_in),
            fmt(s.rows_out),
            outcome_text(s.outcomes),
        ]
        for s in report.stages
    ]
    return header, body


def funnel_table(report: RunReport) -> tuple[list[str], list[list[str]]]:
    return ["stage", "count", "what"], [
        [stage, NOT_RUN if value is None else fmt(value), label] for stage, label, value in report.funnel
    ]


def loss_series(lines: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """`loss` and its parts (keys named *loss*), as (step, value) points."""
    names = sorted(
        {k for r in lines for k, v in r.items() if "loss" in k and isinstance(v, int | float)},
        key=lambda k: (k != "loss", k),
    )
    return {n: [(r["step"], r[n]) for r in lines if isinstance(r.get(n), int | float)] for n in names}


def loss_table(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["series", "steps", "first", "last", "min"]
    body = []
    for name, points in loss_series(lines).items():
        values = [v for _, v in points]
        body.append([name, fmt(len(points)), fmt(values[0]), fmt(values[-1]), fmt(min(values))])
    speed = [r["tokens_per_s"] for r in lines if isinstance(r.get("tokens_per_s"), int | float)]
    if speed:
        body.append(["tokens/s (median)", fmt(len(speed)), "", "", fmt(float(np.median(speed)))])
    return header, body


def score_table(scores: dict) -> tuple[list[str], list[list[str]]]:
    header = ["side", "scores", "mean", "p5", "p50", "p95", "threshold"]
    body = []
    for side, key in (("positives", "pos"), ("negatives", "neg")):
        values = np.asarray(scores[key], dtype=np.float64)
        if values.size:
            p5, p50, p95 = np.percentile(values, [5, 50, 95])
            stats = [fmt(float(values.mean())), fmt(float(p5)), fmt(float(p50)), fmt(float(p95))]
        else:
            stats = ["—"] * 4
        body.append([side, fmt(int(values.size)), *stats, fmt(scores[f"{key}_threshold"])])
    return header, body


def evaluation_tables(results: Any) -> tuple[list[tuple[str, list[str], list[list[str]]]], str | None]:
    """One table per evaluation set: a row per (method, model), a Δ row per method when the results
    hold `baseline` and one other model. Returns (tables, a note when the shape is not understood)."""
    if not isinstance(results, dict):
        return [], "results.json is not a mapping of set -> model -> method -> metrics"
    tables = []
    for set_name, models in results.items():
        if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
            return tables, f"results.json: set {set_name!r} is not model -> method -> metrics"
        found = {
            k for by_method in models.values() for m in by_method.values() if isinstance(m, dict) for k in m
        }
        metrics = [m for m in EVAL_METRICS if m in found] or sorted(found)
        methods = sorted({method for by_method in models.values() for method in by_method})
        others = [m for m in models if m != "baseline"]
        body = []
        for method in methods:
            for model, by_method in models.items():
                values = by_method.get(method)
                if isinstance(values, dict):
                    body.append([method, model, *(fmt(values.get(m)) for m in metrics)])
            if "baseline" in models and len(others) == 1:
                new, old = models[others[0]].get(method), models["baseline"].get(method)
                if isinstance(new, dict) and isinstance(old, dict):
                    deltas = [_delta(new.get(m), old.get(m)) for m in metrics]
                    body.append([method, f"Δ {others[0]} − baseline", *deltas])
        tables.append((set_name, ["method", "model", *metrics], body))
    return tables, None


def evaluation_section(report: RunReport) -> tuple[list[tuple[str, list[str], list[list[str]]]], str | None]:
    if report.evaluation is None:
        return [], NOT_RUN
    tables, note = evaluation_tables(report.evaluation)
    if next(s.status for s in report.stages if s.stage == "evaluate") != "complete":
        note = "evaluate has no complete manifest: these results may be partial" + (
            f"; {note}" if note else ""
        )
    return tables, note


def _delta(new: Any, old: Any) -> str:
    if not isinstance(new, int | float) or not isinstance(old, int | float):
        return "—"
    return f"{new - old:+.4f}"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def md_table(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def render_markdown(report: RunReport) -> str:
    out = [f"# Run report: {report.uri}", "", f"Generated {report.generated_at} by `chuxin-ray report`.", ""]
    out += ["## Stages", "", md_table(*stage_table(report)), ""]
    out += ["## Data funnel", "", md_table(*funnel_table(report)), ""]
    out += ["## Training loss", ""]
    for stage in TRAINING_STAGES:
        out.append(f"### {stage}")
        out.append("")
        out.append(md_table(*loss_table(report.losses[stage])) if stage in report.losses else NOT_RUN)
        out.append("")
    out += ["## Reranker scores", ""]
    if report.scores is None:
        out += [NOT_RUN, ""]
    else:
        out += [_score_caption(report.scores), "", md_table(*score_table(report.scores)), ""]
    out += ["## Evaluation", ""]
    tables, note = evaluation_section(report)
    for set_name, header, body in tables:
        out += [f"### {set_name}", "", md_table(header, body), ""]
    if note:
        out += [note, ""]
    if report.problems:
        out += ["## Problems", "", *(f"- {p}" for p in report.problems), ""]
    return "\n".join(out)


def _score_caption(scores: dict) -> str:
    mode = f", {scores['mode']} thresholds" if scores.get("mode") else ""
    return (
        f"Kept (query, passage) pairs: a sample of {scores['rows']:,} of {scores['rows_total']:,} rows "
        f"from {scores['files']} of {scores['files_total']} files{mode}."
    )


# --------------------------------------------------------------------------------------------------
# SVG charts, drawn by hand: a line chart, an overlaid histogram, horizontal bars
# --------------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 46, 44  # margins; the legend sits in one row above the plot


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]: steps of 1, 2 or 5 x 10^k."""
    if not np.isfinite([lo, hi]).all():
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    power = 10 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = np.floor(lo / step) * step
    return [float(round(first + i * step, 12)) for i in range(int(np.ceil((hi - first) / step)) + 1)]


def _tick_label(v: float) -> str:
    return f"{int(v):,}" if v == int(v) and abs(v) < 1e7 else f"{v:.3g}"


class _Canvas:
    def __init__(self, title: str, x_range: tuple[float, float], y_range: tuple[float, float], labels):
        self.x_ticks, self.y_ticks = nice_ticks(*x_range), nice_ticks(*y_range)
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]
        self.parts = [
            f'<rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        ]
        for v in self.y_ticks:
            y = self.y(v)
            self.parts.append(
                f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_tick_label(v)}</text>'
            )
        for v in self.x_ticks:
            x = self.x(v)
            self.parts.append(
                f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" font-size="11">'
                f"{_tick_label(v)}</text>"
            )
        self.parts.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
            'fill="none" stroke="#888"/>'
            f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle" font-size="12">'
            f"{html.escape(labels[0])}</text>"
            f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})">{html.escape(labels[1])}</text>'
        )

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / ((self.x1 - self.x0) or 1.0) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return H - BOTTOM - (v - self.y0) / ((self.y1 - self.y0) or 1.0) * (H - TOP - BOTTOM)

    def legend(self, names: list[str]) -> None:
        x, y = LEFT, TOP - 8
        for i, name in enumerate(names):
            self.parts.append(
                f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                f'<text x="{x + 18}" y="{y}" font-size="11">{html.escape(name)}</text>'
            )
            x += 18 + 7 * len(name) + 16  # ~7 px per character at font-size 11

    def svg(self) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="sans-serif">{"".join(self.parts)}</svg>'
        )


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str) -> str:
    points = [p for s in series.values() for p in s if np.isfinite(p[1])]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    canvas = _Canvas(title, (min(xs), max(xs)), (min(ys), max(ys)), (x_label, y_label))
    for i, pts in enumerate(series.values()):
        pts = [p for p in pts if np.isfinite(p[1])]
        if len(pts) > CHART_POINTS:
            pts = [pts[j] for j in np.linspace(0, len(pts) - 1, CHART_POINTS).round().astype(int)]
        path = " ".join(f"{canvas.x(x):.1f},{canvas.y(y):.1f}" for x, y in pts)
        color = COLORS[i % len(COLORS)]
        canvas.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    canvas.legend(list(series))
    return canvas.svg()


def histogram_chart(
    title: str, groups: dict[str, list[float]], markers: dict[str, float], bins: int = 40
) -> str:
    """Overlaid histograms on shared bins; `markers` are vertical lines (thresholds)."""
    values = [np.asarray(v, dtype=np.float64) for v in groups.values()]
    values = [v[np.isfinite(v)] for v in values]
    if not any(v.size for v in values):
        return ""
    everything = np.concatenate(values)
    edges = np.histogram_bin_edges(everything, bins=bins)
    heights = [np.histogram(v, bins=edges)[0] for v in values]
    top = max(int(h.max()) for h in heights)
    canvas = _Canvas(title, (float(edges[0]), float(edges[-1])), (0.0, float(top)), ("score", "pairs"))
    for i, h in enumerate(heights):
        color = COLORS[i % len(COLORS)]
        for left, right, count in zip(edges[:-1], edges[1:], h, strict=True):
            if count:
                x, y = canvas.x(left), canvas.y(count)
                canvas.parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(canvas.x(right) - x, 0.5):.1f}" '
                    f'height="{canvas.y(0) - y:.1f}" fill="{color}" fill-opacity="0.45"/>'
                )
    for name, value in markers.items():
        if value is not None and canvas.x0 <= value <= canvas.x1:
            x = canvas.x(value)
            canvas.parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="black" '
                f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{TOP + 12}" font-size="10">'
                f"{html.escape(name)}</text>"
            )
    canvas.legend(list(groups))
    return canvas.svg()


def bar_chart(title: str, items: list[tuple[str, float]]) -> str:
    """Horizontal bars, the value written at the end of each."""
    if not items:
        return ""
    row, label_w = 26, 230
    height = TOP + row * len(items) + 12
    top = max(v for _, v in items) or 1.0
    parts = [
        f'<rect width="{W}" height="{height}" fill="white"/>',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(items):
        y = TOP + i * row
        width = max((W - label_w - 90) * value / top, 1.0)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 8}" fill="{COLORS[0]}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" font-size="12">{fmt(value)}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
        f'viewBox="0 0 {W} {height}" font-family="sans-serif">{"".join(parts)}</svg>'
    )


def svg_img(svg: str, alt: str) -> str:
    if not svg:
        return ""
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{data}">'


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #888; }
"""


def html_table(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        numeric = text[:1].isdigit() or text[:1] in "+-−" and text[1:2].isdigit()
        return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(report: RunReport) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>chuxin-ray report: {esc(report.uri)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run report: {esc(report.uri)}</h1>",
        f'<p class="muted">Generated {esc(report.generated_at)} by <code>chuxin-ray report</code>.</p>',
        "<h2>Stages</h2>",
        html_table(*stage_table(report)),
        "<h2>Data funnel</h2>",
        html_table(*funnel_table(report)),
    ]
    counts = {path: value for (_, path, _), (_, _, value) in zip(FUNNEL, report.funnel, strict=True)}
    labels = {path: label for _, path, label in FUNNEL}
    bars = [(labels[p], counts[p]) for p in FUNNEL_CHART if counts.get(p) is not None]
    out.append(svg_img(bar_chart("From raw records to training queries", bars), "data funnel"))

    out.append("<h2>Training loss</h2>")
    for stage in TRAINING_STAGES:
        out.append(f"<h3>{stage}</h3>")
        if stage not in report.losses:
            out.append(f'<p class="muted">{NOT_RUN}</p>')
            continue
        lines = report.losses[stage]
        chart = line_chart(f"{stage}: loss per optimizer step", loss_series(lines), "step", "loss")
        out += [svg_img(chart, f"{stage} loss"), html_table(*loss_table(lines))]

    out.append("<h2>Reranker scores</h2>")
    if report.scores is None:
        out.append(f'<p class="muted">{NOT_RUN}</p>')
    else:
        s = report.scores
        markers = {"pos threshold": s["pos_threshold"], "neg threshold": s["neg_threshold"]}
        if s.get("mode") == "relative":
            markers = {}  # relative thresholds are shares of another score, not points on this axis
        chart = histogram_chart(
            "Reranker scores of kept pairs", {"positives": s["pos"], "negatives": s["neg"]}, markers
        )
        out += [
            f"<p>{esc(_score_caption(s))}</p>",
            svg_img(chart, "score histograms"),
            html_table(*score_table(s)),
        ]

    out.append("<h2>Evaluation</h2>")
    tables, note = evaluation_section(report)
    for set_name, header, body in tables:
        out += [f"<h3>{esc(set_name)}</h3>", html_table(header, body)]
    if note:
        out.append(f'<p class="muted">{esc(note)}</p>')
    if report.problems:
        out.append("<h2>Problems</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in report.problems) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def write_report(run_uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """Read the run at `run_uri`, write `<run_uri>/report/report.{md,html}`; returns their URIs and
    each stage's status. Raises StorageError only for a URI that cannot be used at all."""
    run = storage.resolve(run_uri, storage_cfg)
    report = collect(run)
    dest = run.child("report")
    storage.write_bytes(dest.child("report.md"), render_markdown(report).encode("utf-8"))
    storage.write_bytes(dest.child("report.html"), render_html(report).encode("utf-8"))
    log.info("report: %s", dest.child("report.html").uri)
    return {
        "markdown": dest.child("report.md").uri,
        "html": dest.child("report.html").uri,
        "stages": {s.stage: s.status for s in report.stages},
        "problems": report.problems,
    }
