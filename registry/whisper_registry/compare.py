"""All versions of a registered model side by side: size, error, speed, aliases; and a plot.

Reads only version tags (what register and evaluate wrote), so it is cheap and shows exactly what
the MLflow UI shows. Each error rate comes with its bootstrap interval (``cer_ci``, ``wer_ci``) and
each evaluated version with a link to its page of worst utterances (``report``). The plot puts
size on x, the headline error rate on y with its interval as an error bar, and speed (RTF) as the
marker colour; it is written locally and logged as an artifact of a "compare" run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow

from whisper_registry import metrics, tags, tracking, versions

_logger = logging.getLogger(__name__)

COLUMNS = ("version", "quantization", "size_mb", "cer", "cer_ci", "wer", "wer_ci", "rtf", "latency_p95_s", "dataset", "aliases", "report")


@dataclass(frozen=True)
class VersionSummary:
    version: str
    quantization: Optional[str]
    size_mb: Optional[float]
    cer: Optional[float]
    wer: Optional[float]
    rtf: Optional[float]
    latency_p95_s: Optional[float]
    headline: Optional[str]
    dataset: Optional[str]  # digest of the evaluation dataset
    aliases: tuple[str, ...]
    # The bootstrap intervals of the error rates ((low, high), None for an older evaluation), and
    # the URI of the evaluation's page of its worst utterances.
    cer_ci: Optional[tuple[float, float]] = None
    wer_ci: Optional[tuple[float, float]] = None
    report: Optional[str] = None

    @property
    def error(self) -> Optional[float]:
        return getattr(self, self.headline) if self.headline in ("cer", "wer") else None

    @property
    def error_ci(self) -> Optional[tuple[float, float]]:
        return getattr(self, f"{self.headline}_ci") if self.headline in ("cer", "wer") else None


@dataclass(frozen=True)
class Comparison:
    name: str
    versions: list[VersionSummary]
    plot_path: Optional[Path]
    run_id: Optional[str]

    def rows(self) -> list[dict[str, str]]:
        """The table as strings, one dict per version (``-`` where a value is missing)."""
        return [
            {
                "version": v.version,
                "quantization": v.quantization or "-",
                "size_mb": _fmt(v.size_mb, ".1f"),
                "cer": _fmt(v.cer, ".4f"),
                "cer_ci": _fmt_ci(v.cer_ci),
                "wer": _fmt(v.wer, ".4f"),
                "wer_ci": _fmt_ci(v.wer_ci),
                "rtf": _fmt(v.rtf, ".3f"),
                "latency_p95_s": _fmt(v.latency_p95_s, ".3f"),
                "dataset": (v.dataset or "-")[:12],
                "aliases": ",".join(v.aliases) or "-",
                "report": v.report or "-",
            }
            for v in self.versions
        ]


def summarize(name: str) -> list[VersionSummary]:
    """One summary per complete version of ``name``, oldest first, from the version tags.

    A registration that never finished (``versions.is_complete``) is left out, with a warning.
    """
    aliases = versions.aliases_by_version(name)
    summaries = []
    for mv in versions.list_all(name):
        if not versions.is_complete(mv):
            _logger.warning("Leaving out version %s of %r: its registration did not finish (register again to remove it)", mv.version, name)
            continue
        summaries.append(_summary(mv, tuple(sorted(aliases.get(str(mv.version), [])))))
    return summaries


def compare(name: str, *, output_dir: str | Path = ".", log_artifact: bool = True) -> Comparison:
    """Summarise every version of ``name`` and plot size vs error vs speed.

    Args:
        name: the registered model.
        output_dir: where the PNG is written (``<name>-compare.png``).
        log_artifact: also log the table and the plot to a "compare" run.

    Returns:
        The summaries, the local plot path (None when no version is evaluated) and the run id.

    Raises:
        ModelNotFoundError: no such registered model.
    """
    setup = tracking.configure()
    summaries = summarize(name)
    evaluated = [s for s in summaries if s.error is not None and s.size_mb is not None]
    plot_path = None
    if evaluated:
        plot_path = Path(output_dir) / f"{_safe(name)}-compare.png"
        _plot(name, evaluated, plot_path)
    comparison = Comparison(name, summaries, plot_path, None)
    if not log_artifact:
        return comparison
    with mlflow.start_run(experiment_id=setup.experiment_id, run_name=f"compare {name}") as run:
        mlflow.set_tags({tags.RUN_KIND: "compare", tags.RUN_MODEL_NAME: name})
        rows = comparison.rows()
        mlflow.log_table({key: [r[key] for r in rows] for key in COLUMNS}, "compare/versions.json")
        if plot_path is not None:
            mlflow.log_artifact(str(plot_path), artifact_path="compare")
    return Comparison(name, summaries, plot_path, run.info.run_id)


def _summary(mv, aliases: tuple[str, ...]) -> VersionSummary:
    t = mv.tags or {}
    size_bytes = _num(t.get(tags.SIZE_BYTES))
    return VersionSummary(
        version=str(mv.version),
        quantization=t.get(tags.QUANTIZATION),
        size_mb=None if size_bytes is None else size_bytes / 1e6,
        cer=_num(t.get(f"{tags.EVAL_PREFIX}cer")),
        wer=_num(t.get(f"{tags.EVAL_PREFIX}wer")),
        rtf=_num(t.get(f"{tags.EVAL_PREFIX}rtf")),
        latency_p95_s=_num(t.get(f"{tags.EVAL_PREFIX}latency_p95_s")),
        headline=t.get(tags.EVAL_HEADLINE),
        dataset=t.get(tags.EVAL_DATASET),
        aliases=aliases,
        cer_ci=_ci(t, "cer"),
        wer_ci=_ci(t, "wer"),
        report=t.get(tags.EVAL_REPORT),
    )


def _or_nan(value: Optional[float]) -> float:
    """A figure matplotlib can place: NaN (left out of the plot) where there is none."""
    return float("nan") if value is None else value


def _plot(name: str, evaluated: list[VersionSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    headlines = {s.headline for s in evaluated}
    datasets = {s.dataset for s in evaluated}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rtfs = [_or_nan(s.rtf) for s in evaluated]
    bars = [(_or_nan(s.size_mb), s.error, s.error_ci) for s in evaluated if s.error is not None and s.error_ci is not None]
    if bars:  # the 95 % bootstrap interval of each version's error rate
        ax.errorbar(
            [size for size, _, _ in bars],
            [error for _, error, _ in bars],
            yerr=[[error - low for _, error, (low, _) in bars], [high - error for _, error, (_, high) in bars]],
            fmt="none",
            ecolor="gray",
            elinewidth=1.5,
            capsize=5,
            zorder=1,
        )
    points = ax.scatter(
        [_or_nan(s.size_mb) for s in evaluated], [_or_nan(s.error) for s in evaluated], c=rtfs, cmap="viridis_r", s=120, edgecolors="black"
    )
    fig.colorbar(points, ax=ax, label="real-time factor (lower is faster)")
    for s in evaluated:
        label = f"v{s.version} {s.quantization or ''}" + (f" @{','.join(s.aliases)}" if s.aliases else "")
        ax.annotate(label, (s.size_mb, s.error), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"error rate ({'/'.join(sorted(h for h in headlines if h))})" + (", 95% interval" if bars else ""))
    title = f"{name}: size vs error vs speed"
    if len(datasets) > 1:
        title += " (versions evaluated on different datasets)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.2)  # room for the labels of the outermost points
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _num(value: Optional[str]) -> Optional[float]:
    try:
        return None if value in (None, "") else float(value)
    except ValueError:
        return None


def _ci(version_tags: dict[str, str], metric: str) -> Optional[tuple[float, float]]:
    low = _num(version_tags.get(f"{tags.EVAL_PREFIX}{metric}{metrics.CI_LOW}"))
    high = _num(version_tags.get(f"{tags.EVAL_PREFIX}{metric}{metrics.CI_HIGH}"))
    return None if low is None or high is None else (low, high)


def _fmt_ci(interval: Optional[tuple[float, float]]) -> str:
    return "-" if interval is None else f"{interval[0]:.4f}-{interval[1]:.4f}"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
