"""An evaluation's worst utterances as one HTML page: look at the errors rather than read them.

Each utterance shows its normalised reference above its normalised hypothesis (what was scored),
aligned unit by unit with jiwer's alignment: a column per aligned word (characters for languages
scored by characters), marked ``op-equal``, ``op-substitute``, ``op-delete`` or ``op-insert``.
The figures with their bootstrap intervals head the page. Self-contained: no script, no fetch.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import jiwer

from whisper_registry.bootstrap import Interval

WORST = 30  # utterances shown: the worst by error count
GAP = "\u2205"  # the empty side of an insertion or a deletion

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.figures td,table.figures th{padding:2px 10px;text-align:right}
.utterance{margin:1em 0;padding:.5em;border:1px solid #ddd;border-radius:4px}
.utterance .meta{font-size:.85em;color:#555}
table.alignment{border-collapse:collapse;margin-top:.3em}
table.alignment td{padding:1px 4px;border:1px solid #eee;white-space:nowrap}
table.alignment th{font-weight:normal;color:#777;padding-right:6px;text-align:left}
.op-equal{color:#222}
.op-substitute{background:#fde2a8}
.op-delete{background:#f9c0c0;text-decoration:line-through}
.op-insert{background:#c4ecc4}
.legend span{padding:0 6px;margin-right:4px}
"""


def render(
    title: str,
    figures: Mapping[str, float],
    intervals: Mapping[str, Interval],
    utterances: Sequence[Mapping[str, Any]],
    *,
    worst: int = WORST,
) -> str:
    """The page: ``figures`` (with ``intervals`` where known) and the ``worst`` utterances.

    Args:
        title: the page's heading, e.g. ``"tiny v2 on clips.jsonl"``.
        figures: metric name -> value (an evaluation's metrics).
        intervals: metric name -> its bootstrap interval.
        utterances: per-utterance rows with ``audio``, ``language``, ``reference_normalized``,
            ``hypothesis_normalized``, ``errors``, ``unit`` (``word`` or ``char``), ``error_rate``.
        worst: how many utterances with errors to show, worst first.
    """
    ranked = sorted((u for u in utterances if u["errors"]), key=lambda u: (-u["errors"], -(u["error_rate"] or 0)))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _figures_table(figures, intervals),
        f"<h2>The {min(worst, len(ranked))} worst of {len(utterances)} utterances</h2>",
        (
            '<p class="legend">Reference above, hypothesis below, after normalisation: '
            '<span class="op-substitute">substituted</span><span class="op-delete">deleted</span>'
            '<span class="op-insert">inserted</span></p>'
        ),
    ]
    parts += [_utterance(u) for u in ranked[:worst]]
    if not ranked:
        parts.append('<p class="none">No utterance has an error.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _figures_table(figures: Mapping[str, float], intervals: Mapping[str, Interval]) -> str:
    rows = []
    for name in sorted(intervals):
        i = intervals[name]
        rows.append(
            f'<tr class="figure" data-metric="{_e(name)}"><th>{_e(name)}</th><td>{i.value:.4f}</td>'
            f"<td>{i.low:.4f} to {i.high:.4f}</td><td>{i.n}</td></tr>"
        )
    for name in ("rtf", "latency_p50_s", "latency_p95_s", "n_utterances", "n_skipped"):
        if name in figures:
            rows.append(f'<tr class="figure" data-metric="{name}"><th>{name}</th><td>{figures[name]:.4g}</td><td></td><td></td></tr>')
    confidence = next(iter(intervals.values())).confidence if intervals else 0.95
    return (
        '<table class="figures"><tr><th></th><th>value</th>'
        f"<th>{confidence:.0%} interval (bootstrap over utterances)</th><th>utterances</th></tr>" + "".join(rows) + "</table>"
    )


def _utterance(u: Mapping[str, Any]) -> str:
    cells = alignment(u["reference_normalized"], u["hypothesis_normalized"], by_characters=u["unit"] == "char")
    ref_row = "".join(f'<td class="op-{op}">{_e(ref)}</td>' for op, ref, _ in cells)
    hyp_row = "".join(f'<td class="op-{op}">{_e(hyp)}</td>' for op, _, hyp in cells)
    rate = u.get("error_rate")
    return (
        f'<div class="utterance" data-errors="{u["errors"]}">'
        f'<div class="meta">{_e(str(u["audio"]))} &middot; {_e(str(u.get("language") or "?"))} &middot; '
        f"{u['errors']} {u['unit']} errors{'' if rate is None else f', rate {rate:.3f}'}</div>"
        f'<table class="alignment"><tr class="reference"><th>ref</th>{ref_row}</tr>'
        f'<tr class="hypothesis"><th>hyp</th>{hyp_row}</tr></table></div>'
    )


def alignment(reference: str, hypothesis: str, *, by_characters: bool = False) -> list[tuple[str, str, str]]:
    """(op, reference unit, hypothesis unit) per aligned column; ``GAP`` on the empty side."""
    ref = list(reference.replace(" ", "")) if by_characters else reference.split()
    hyp = list(hypothesis.replace(" ", "")) if by_characters else hypothesis.split()
    if not ref or not hyp:  # jiwer cannot align against nothing
        return [("delete", r, GAP) for r in ref] + [("insert", GAP, h) for h in hyp]
    process = jiwer.process_characters if by_characters else jiwer.process_words
    out = process("".join(ref) if by_characters else " ".join(ref), "".join(hyp) if by_characters else " ".join(hyp))
    cells: list[tuple[str, str, str]] = []
    for chunk in out.alignments[0]:
        refs, hyps = ref[chunk.ref_start_idx : chunk.ref_end_idx], hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        if chunk.type == "insert":
            cells += [("insert", GAP, h) for h in hyps]
        elif chunk.type == "delete":
            cells += [("delete", r, GAP) for r in refs]
        else:  # equal or substitute: one column per pair
            cells += [(chunk.type, r, h) for r, h in zip(refs, hyps, strict=True)]  # same length in these chunks
    return cells


def _e(text: str | None) -> str:
    return html.escape(text or "")
