"""The README's examples run as written: each fenced block marked ``<!-- test: GROUP -->`` runs, in
order, in a folder of its group holding what the README assumes (``./whisper-small-zh``: a real
transformers Whisper checkpoint; ``clip.wav``: real Mandarin speech; ``eval.jsonl``), against a
real sqlite registry (``MLFLOW_TRACKING_URI=sqlite:///mlflow.db``, as the install section sets it).

``<!-- test: GROUP, serves URL -->``: the block's first command is a server, run in the background
until URL answers; the other lines run against it (the README's port becomes a free one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from mlflow import MlflowClient

from devkit.offline import OFFLINE
from devkit.processes import ServerProcess, free_port, venv_path_env
from whisper_registry.metrics import score

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
_BLOCK = re.compile(r"^([ \t]*)<!-- test: (?P<marker>[^>]*?) -->\n\1```(?P<lang>python|bash)\n(?P<code>.*?)\n\1```",
                    re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    group: str
    lang: str
    code: str
    serves: Optional[str]  # a ready URL: the first command is a server


def readme_blocks() -> list[Block]:
    blocks = []
    for match in _BLOCK.finditer(README.read_text()):
        group, _, serves = match["marker"].partition(", serves ")
        code = textwrap.dedent("\n".join(line for line in match["code"].splitlines()))
        blocks.append(Block(group.strip(), match["lang"], code, serves.strip() or None))
    return blocks


def test_the_readme_marks_its_examples():
    groups = [b.group for b in readme_blocks()]
    assert groups.count("flavor") == 2 and groups.count("registry") == 1, groups


def test_the_extras_table_is_pyproject_s():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    section = README.read_text().split("## Install as a package", 1)[1].split("\n## ", 1)[0]
    table = {row[0].strip(" `"): {n.strip() for n in row[1].split(",")}
             for row in (line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `"))}
    assert table == {extra: {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements}
                     for extra, requirements in extras.items() if extra != "dev"}


@pytest.mark.real_weights
@pytest.mark.server
def test_the_readme_examples_run_as_written(tmp_path, whisper_base_hf, speech_clips):
    # Sentences: the counting clip comes out as digits, which the CER would count as errors.
    mandarin = [next(c for c in speech_clips if c.name == name) for name in ("nihao_shijie", "pangrama")]
    outputs: dict[str, list[str]] = {}
    for block in readme_blocks():
        work = tmp_path / block.group
        if not work.exists():
            _prepare(work, whisper_base_hf, mandarin)
        outputs.setdefault(block.group, []).append(_run(block, work))

    reference = mandarin[0].text
    printed, served = outputs["flavor"]
    assert score([reference], [printed.strip().splitlines()[-1]], "zh")["cer"] <= 0.5, printed
    (row,) = json.loads(served)["predictions"]
    assert row["error"] == "" and row["language"] == "zh", row
    assert score([reference], [row["text"]], "zh")["cer"] <= 0.5, row

    client = MlflowClient(f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}")
    versions = client.search_model_versions("name='whisper-zh'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert str(client.get_model_version_by_alias("whisper-zh", "staging").version) == "1"
    assert "eval.cer" in client.get_model_version("whisper-zh", "1").tags


def _prepare(work: Path, checkpoint: Path, clips: list) -> None:
    """What the README's examples assume in their folder."""
    (work / "clips").mkdir(parents=True)
    (work / "whisper-small-zh").symlink_to(checkpoint, target_is_directory=True)
    (work / "clip.wav").write_bytes(clips[0].path.read_bytes())
    rows = []
    for i, clip in enumerate(clips, 1):
        (work / "clips" / f"{i}.wav").write_bytes(clip.path.read_bytes())
        rows.append(json.dumps({"audio": f"clips/{i}.wav", "text": clip.text, "language": "zh"}, ensure_ascii=False))
    (work / "eval.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _env() -> dict[str, str]:
    env = venv_path_env()
    for key in [k for k in env if k.startswith("MLFLOW_")]:
        del env[key]
    env.update(OFFLINE, MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    return env


def _run(block: Block, work: Path) -> str:
    """The block's output; it must exit 0."""
    code, env = block.code, _env()
    server = None
    if block.serves:
        port = str(free_port())
        readme_port = re.search(r":(\d+)/", block.serves)[1]
        code = code.replace(readme_port, port)
        first, _, code = code.partition("\n")
        server = ServerProcess(["bash", "-c", f"exec {first}"], ready_url=block.serves.replace(readme_port, port),
                               log_path=work / "server.log", env=env, cwd=work, timeout_s=240)
        server.start()
    try:
        command = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    finally:
        if server is not None:
            server.stop()
    assert done.returncode == 0, f"{block.group} block:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout
