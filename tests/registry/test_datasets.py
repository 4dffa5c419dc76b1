import pytest

from tests.registry.conftest import clip_rows, write_manifest
from whisper_registry.datasets import load_dataset
from whisper_registry.errors import DatasetError


@pytest.fixture
def bad_audio(tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF this is not audio at all" * 10)
    return path


def test_jsonl_and_csv_manifests_read_the_same_rows_and_digest(tmp_path, en_zh_clips):
    rows = clip_rows(en_zh_clips)
    jsonl = load_dataset(write_manifest(tmp_path / "m.jsonl", rows))
    csv_ = load_dataset(write_manifest(tmp_path / "m.csv", rows, fmt="csv"))
    assert len(jsonl.rows) == len(en_zh_clips) and not jsonl.bad_rows
    assert [r.reference for r in jsonl.rows] == [c.text for c in en_zh_clips]
    assert {r.language for r in jsonl.rows} == {"en", "zh"}
    assert jsonl.digest == csv_.digest  # same content, same dataset


def test_digest_changes_with_the_content(tmp_path, en_zh_clips):
    rows = clip_rows(en_zh_clips)
    base = load_dataset(write_manifest(tmp_path / "a.jsonl", rows)).digest
    rows[0]["text"] = "something else"
    assert load_dataset(write_manifest(tmp_path / "b.jsonl", rows)).digest != base
    assert load_dataset(write_manifest(tmp_path / "c.jsonl", rows[::-1])).digest != base  # text changed
    assert load_dataset(write_manifest(tmp_path / "d.jsonl", rows[1:])).digest != base


def test_relative_audio_paths_are_relative_to_the_manifest(tmp_path, en_zh_clips):
    clip = en_zh_clips[0]
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "x.wav").write_bytes(clip.path.read_bytes())
    data = load_dataset(write_manifest(tmp_path / "m.jsonl", [{"audio": "audio/x.wav", "text": clip.text}]))
    assert data.rows[0].where == "audio/x.wav" and data.rows[0].language is None


def test_missing_and_undecodable_audio_are_reported_by_path(tmp_path, en_zh_clips, bad_audio):
    import wave

    silent = tmp_path / "empty.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(en_zh_clips[0].path.read_bytes()[:30])
    rows = clip_rows(en_zh_clips[:2]) + [
        {"audio": str(silent), "text": "hello"},
        {"audio": str(truncated), "text": "hello"},
        {"audio": str(tmp_path / "nowhere.wav"), "text": "hello"},
        {"audio": str(bad_audio), "text": "hello"},
        {"audio": str(en_zh_clips[0].path), "text": "hello", "language": "english"},
    ]
    data = load_dataset(write_manifest(tmp_path / "m.jsonl", rows))
    assert len(data.rows) == 2
    reasons = {b.where: b.reason for b in data.bad_rows}
    assert "not found" in reasons[str(tmp_path / "nowhere.wav")]
    assert "not decodable" in reasons[str(bad_audio)]
    assert "no samples" in reasons[str(silent)] and "not decodable" in reasons[str(truncated)]
    assert "unknown language 'english'" in reasons[str(en_zh_clips[0].path)]


def test_malformed_lines_and_missing_text_are_bad_rows(tmp_path, en_zh_clips):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "%s", "text": "hi"}\nnot json\n{"audio": "%s"}\n' % (en_zh_clips[0].path, en_zh_clips[1].path))
    data = load_dataset(path)
    assert len(data.rows) == 1
    assert [b.where for b in data.bad_rows] == ["m.jsonl:2", str(en_zh_clips[1].path)]


def test_unreadable_datasets_raise(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DatasetError, match="Unknown dataset format"):
        load_dataset(tmp_path / "m.txt")
    (tmp_path / "m.csv").write_text("file,words\n")
    with pytest.raises(DatasetError, match="header row"):
        load_dataset(tmp_path / "m.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(tmp_path / "empty.jsonl")


def test_hugging_face_dataset_saved_to_disk(tmp_path, en_zh_clips):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({
        "audio": [str(c.path) for c in en_zh_clips],
        "sentence": [c.text for c in en_zh_clips],
        "language": [c.language for c in en_zh_clips],
    }).cast_column("audio", datasets.Audio(sampling_rate=16000))
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "hf"))
    data = load_dataset(tmp_path / "hf")
    assert len(data.rows) == len(en_zh_clips) and not data.bad_rows
    assert [r.reference for r in data.rows] == [c.text for c in en_zh_clips]
    manifest = load_dataset(write_manifest(tmp_path / "m.jsonl", clip_rows(en_zh_clips)))
    assert data.digest == manifest.digest


def test_a_row_without_audio_says_so():
    """A row built with neither audio bytes nor a path names itself, not an AttributeError on None."""
    from whisper_registry.datasets import Row

    with pytest.raises(DatasetError, match="row 7: the row has no audio"):
        Row("row 7", "hello").read_audio()
