"""The page of an evaluation's worst utterances, as a browser renders it, and compare's links to it."""

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import mlflow
import pytest

from whisper_registry.bootstrap import rate_interval
from whisper_registry.compare import compare
from whisper_registry.metrics import score_utterance
from whisper_registry.report_html import GAP, alignment, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _row(audio, reference, hypothesis, language):
    u = score_utterance(reference, hypothesis, language)
    return {"audio": audio, "language": language, "reference_normalized": u.reference, "hypothesis_normalized": u.hypothesis,
            "errors": u.errors, "unit": "char" if u.by_characters else "word", "error_rate": u.error_rate}


ROWS = [
    _row("a.wav", "the quick brown fox jumps", "the quack brown fox jumps high", "en"),  # 1 sub, 1 ins
    _row("b.wav", "Uno, dos, tres, cuatro, cinco.", "1, 2, 3, 4, 5.", "es"),  # equal once normalised
    _row("c.wav", "a b c d", "a c d", "en"),  # 1 deletion
    _row("d.wav", "他在二零一五年买了十五本书", "他在2015年买了16本书", "zh"),  # 1 character substituted
]


def test_alignment_marks_each_operation():
    assert alignment("the quick brown fox", "the quack brown fox jumps") == [
        ("equal", "the", "the"), ("substitute", "quick", "quack"), ("equal", "brown", "brown"),
        ("equal", "fox", "fox"), ("insert", GAP, "jumps")]
    assert alignment("a b c", "a c") == [("equal", "a", "a"), ("delete", "b", GAP), ("equal", "c", "c")]
    assert alignment("", "noise") == [("insert", GAP, "noise")]


class _Cells(HTMLParser):
    """The rendered page's utterances: per utterance, its ref and hyp rows as (class, text) cells."""

    def __init__(self):
        super().__init__()
        self.utterances, self.figures, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "utterance":
            self.utterances.append({"errors": int(a["data-errors"]), "reference": [], "hypothesis": []})
        elif tag == "tr" and a.get("class") in ("reference", "hypothesis"):
            self._row = a["class"]
        elif tag == "tr" and a.get("class") == "figure":
            self.figures.append(a["data-metric"])
        elif tag == "td" and self._row and (a.get("class") or "").startswith("op-"):
            self._cell = [a["class"][3:], ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.utterances[-1][self._row].append(tuple(self._cell))
            self._cell = None
        elif tag == "tr":
            self._row = None


def _dump_dom(path) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: .ci/chromium.sh installs it (make test runs it)")
        pytest.skip("chromium is not installed (apt-get install chromium, or make chromium as root)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=180,  # a failure bound only
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_renders_in_a_browser_with_each_operation_marked(tmp_path):
    intervals = {"wer": rate_interval([2, 0, 1], [5, 5, 4]), "cer_zh": rate_interval([1], [10])}
    page = tmp_path / "report.html"
    page.write_text(render("tiny v1 on clips", {"wer": 0.21, "rtf": 0.3}, intervals, ROWS), encoding="utf-8")
    cells = _Cells()
    cells.feed(_dump_dom(page))
    # The figures with their intervals head the page; the utterance without errors is left out, worst first.
    assert cells.figures == ["cer_zh", "wer", "rtf"]
    assert [u["errors"] for u in cells.utterances] == [2, 1, 1]
    first, third = cells.utterances[0], cells.utterances[2]
    assert first["reference"] == [("equal", "the"), ("substitute", "quick"), ("equal", "brown"), ("equal", "fox"),
                                  ("equal", "jumps"), ("insert", GAP)]
    assert first["hypothesis"][1] == ("substitute", "quack") and first["hypothesis"][-1] == ("insert", "high")
    deleted = cells.utterances[1] if ("delete", "b") in cells.utterances[1]["reference"] else third
    assert ("delete", "b") in deleted["reference"] and ("delete", GAP) in deleted["hypothesis"]
    chinese = next(u for u in cells.utterances if u is not deleted and u is not first)
    assert [c for c in chinese["reference"] if c[0] != "equal"] == [("substitute", "5")]  # 十五 vs 16, as digits
    assert [c for c in chinese["hypothesis"] if c[0] != "equal"] == [("substitute", "6")]


def test_compare_shows_intervals_and_links_each_versions_page(tiny_evaluated, tmp_path):
    _, (eval1, eval2) = tiny_evaluated
    rows = compare("tiny", output_dir=tmp_path).rows()
    for row, result in zip(rows, (eval1, eval2)):
        assert row["cer_ci"] == f"{result.metrics['cer_ci_low']:.4f}-{result.metrics['cer_ci_high']:.4f}"
        page = mlflow.artifacts.load_text(row["report"])
        assert f"tiny version {row['version']}" in page and 'data-metric="cer"' in page
