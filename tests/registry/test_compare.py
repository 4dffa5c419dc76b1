import json

import mlflow
from mlflow import MlflowClient

from whisper_registry.compare import compare
from whisper_registry.promote import promote


def test_table_and_plot_of_all_versions(tiny_evaluated, tmp_path):
    _, (eval1, eval2) = tiny_evaluated
    promote("tiny", "1", "production")
    comparison = compare("tiny", output_dir=tmp_path / "out")
    rows = comparison.rows()
    assert [(r["version"], r["quantization"], r["aliases"]) for r in rows] == [("1", "int8", "production"), ("2", "float32", "-")]
    assert float(rows[0]["size_mb"]) < float(rows[1]["size_mb"])
    assert rows[0]["cer"] == f"{eval1.metrics['cer']:.4f}" and rows[1]["rtf"] == f"{eval2.metrics['rtf']:.3f}"
    assert comparison.plot_path == tmp_path / "out" / "tiny-compare.png"
    assert comparison.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in MlflowClient().list_artifacts(comparison.run_id, "compare")}
    assert artifacts == {"compare/tiny-compare.png", "compare/versions.json"}
    table = json.loads(open(mlflow.artifacts.download_artifacts(run_id=comparison.run_id, artifact_path="compare/versions.json")).read())
    assert len(table["data"]) == 2


def test_unevaluated_versions_are_listed_without_a_plot(tiny_registered, tmp_path):
    comparison = compare("tiny", output_dir=tmp_path, log_artifact=False)
    assert [r["cer"] for r in comparison.rows()] == ["-", "-"]
    assert comparison.plot_path is None and comparison.run_id is None
