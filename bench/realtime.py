"""Live streams against a service's ``/v1/realtime``: N clients at real-time pace, each turn's
latencies measured on the client's clock.

A stream is a session (16 kHz PCM, server VAD) that sends real speech in 100 ms chunks as a
microphone would: ``TURNS`` turns, each about 7 s of speech (three clips with short pauses) and
then silence. For each turn: the first delta after the turn's speech began, and the final text
(``completed``) after its speech ended, both measured from when that audio was sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

CHUNK_S = 0.1
SILENCE_MS = 500  # server VAD's default silence (a pause inside a turn may close it: its pieces are joined)
TRAILING_S = 2.0  # silence after each turn's speech


@dataclass
class TurnTimes:
    start_ms: int  # where its speech starts in the session's audio
    speech_start: float  # client clock: when the turn's first speech sample was sent
    speech_end: float  # and its last
    first_delta: Optional[float] = None
    completed: Optional[float] = None
    transcript: str = ""
    audio_ms: tuple[int, int] = (0, 0)  # the turn as the server cut it


@dataclass
class StreamResult:
    turns: list[TurnTimes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def one_turn(clips: dict[str, np.ndarray]) -> np.ndarray:
    """About 7 s of speech as int16 at 16 kHz."""
    gap = np.zeros(3200, dtype=np.float32)
    speech = np.concatenate([clips["quick_brown_fox"], gap, clips["counting"], gap, clips["hello_world"]])
    return (np.clip(speech, -1, 1) * 32767).round().astype("<i2")


async def stream(url: str, speech: np.ndarray, turns: int, key: Optional[str], offset_s: float) -> StreamResult:
    """One live client; ``offset_s``: when it starts, so that streams do not send in lockstep."""
    from websockets.asyncio.client import connect

    await asyncio.sleep(offset_s)
    result = StreamResult()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with connect(
        url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription", additional_headers=headers, max_size=None, open_timeout=120
    ) as ws:
        update = {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 16000},
                    "transcription": {"language": "en"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": SILENCE_MS},
                }
            },
        }
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        done = asyncio.Event()
        reader = asyncio.ensure_future(_read(ws, result, done))
        silence = np.zeros(int(16000 * TRAILING_S), dtype="<i2")
        step = int(16000 * CHUNK_S)
        started = time.monotonic()
        sent = 0
        for _ in range(turns):
            for part, is_speech in ((speech, True), (silence, False)):
                for i in range(0, len(part), step):
                    now = time.monotonic()
                    if is_speech and i == 0:
                        result.turns.append(TurnTimes(sent * 1000 // 16000, speech_start=now, speech_end=math.inf))
                    await ws.send(
                        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(part[i : i + step].tobytes()).decode()})
                    )
                    sent += len(part[i : i + step])
                    if is_speech and i + step >= len(part):
                        result.turns[-1].speech_end = time.monotonic()
                    await asyncio.sleep(max(started + sent / 16000 - time.monotonic(), 0))
        try:
            await asyncio.wait_for(done.wait(), 120)
        except asyncio.TimeoutError:
            result.errors.append("not every turn completed within 120 s of the stream's end")
        reader.cancel()
    return result


async def _read(ws: Any, result: StreamResult, done: asyncio.Event) -> None:
    """Each server item belongs to the client turn whose speech it starts in (server VAD may cut
    a turn in two: its first delta is the earliest, its final text the last)."""
    items: dict[str, TurnTimes] = {}
    open_items: set[str] = set()
    async for message in ws:
        event = json.loads(message)
        now = time.monotonic()
        kind = event["type"]
        if kind == "input_audio_buffer.speech_started":
            starts = [t for t in result.turns if t.start_ms <= event["audio_start_ms"] + 400]
            if starts:
                items[event["item_id"]] = starts[-1]
                open_items.add(event["item_id"])
        elif kind.endswith("transcription.delta") and event["item_id"] in items:
            turn = items[event["item_id"]]
            turn.first_delta = turn.first_delta or now
        elif kind.endswith("transcription.completed") and event["item_id"] in items:
            turn = items[event["item_id"]]
            turn.completed, turn.transcript = now, (turn.transcript + " " + event["transcript"]).strip()
            open_items.discard(event["item_id"])
        elif kind == "error" or kind.endswith("transcription.failed"):
            result.errors.append(event["error"].get("message", str(event["error"])))
            open_items.discard(event.get("item_id", ""))
        if not open_items and result.turns and all(t.completed and t.completed >= t.speech_end for t in result.turns):
            done.set()


def run_streams(url: str, speech: np.ndarray, count: int, turns: int, key: Optional[str] = None) -> list[StreamResult]:
    """``count`` concurrent streams, started at random offsets within one chunk's second."""
    offsets = [random.Random(i).uniform(0, 1.0) for i in range(count)]

    async def all_streams() -> list[StreamResult]:
        return list(await asyncio.gather(*(stream(url, speech, turns, key, o) for o in offsets)))

    return asyncio.run(all_streams())


def latencies(results: list[StreamResult]) -> dict[str, Any]:
    """p95 of the first delta (after speech start) and of the final text (after speech end)."""
    first = [t.first_delta - t.speech_start for r in results for t in r.turns if t.first_delta]
    final = [t.completed - t.speech_end for r in results for t in r.turns if t.completed]
    turns = sum(len(r.turns) for r in results)
    return {
        "turns": turns,
        "completed": len(final),
        "without_delta": turns - len(first),
        "first_delta_p95_s": _p95(first),
        "final_p95_s": _p95(final),
        "errors": sorted({e for r in results for e in r.errors})[:5],
    }


def _p95(values: list[float]) -> Optional[float]:
    return round(float(np.percentile(values, 95)), 3) if values else None
