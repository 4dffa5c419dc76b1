"""The audio side of a live transcription session: PCM16 in, 16 kHz samples out, turns cut by
Silero VAD as audio arrives, and the local-agreement policy that turns successive decodes of a
growing turn into deltas that are never taken back.

Nothing here decodes speech or talks to a client (``whisper_bento.realtime`` does both); numpy,
PyAV and onnxruntime are imported when a session first needs them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16000  # what Whisper and Silero take
RATES = (24000, 16000)  # OpenAI's audio/pcm rate, and Whisper's own
_WINDOW = 512  # Silero's window at 16 kHz (32 ms)
_CONTEXT = 64  # samples of the previous window Silero sees with each one


class Pcm16:
    """Little-endian PCM16 mono at ``rate`` -> float32 at 16 kHz, chunk by chunk; 24 kHz goes
    through PyAV's resampler (as faster-whisper decodes a file), which keeps its state across chunks."""

    def __init__(self, rate: int) -> None:
        if rate not in RATES:
            raise ValueError(f"rate {rate} is not served; send audio/pcm at {' or '.join(map(str, RATES))} Hz")
        self.rate = rate
        self._resampler: Any = None

    def __call__(self, data: bytes) -> np.ndarray:
        import numpy as np

        pcm = np.frombuffer(data, dtype="<i2")
        if self.rate != SAMPLE_RATE and pcm.size:
            import av

            if self._resampler is None:
                self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.rate
            frames = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
            pcm = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int16)
        return pcm.astype(np.float32) / 32768.0


class AudioBuffer:
    """A session's audio at 16 kHz, addressed by absolute sample (since the session began); only
    what a turn may still need is kept (``trim``). Locked: a decode reads it while audio arrives."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.start = 0  # the first sample kept
        self.end = 0  # one past the last sample received
        self._lock = threading.Lock()

    def append(self, samples: np.ndarray) -> None:
        with self._lock:
            if len(samples):
                self._chunks.append(samples)
                self.end += len(samples)

    def slice(self, start: int, end: int) -> np.ndarray:
        """A copy of samples [start, end) (clipped to what is kept)."""
        import numpy as np

        with self._lock:
            whole = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
            if len(self._chunks) > 1:
                self._chunks = [whole]
            return whole[max(start, self.start) - self.start : max(min(end, self.end) - self.start, 0)].copy()

    def trim(self, keep_from: int) -> None:
        """Drop the samples before ``keep_from``."""
        with self._lock:
            drop = min(keep_from, self.end) - self.start
            if drop <= 0:
                return
            while self._chunks and len(self._chunks[0]) <= drop:
                drop -= len(self._chunks[0])
                self.start += len(self._chunks.pop(0))
            if drop > 0:
                self._chunks[0] = self._chunks[0][drop:]
                self.start += drop

    def clear(self) -> None:
        with self._lock:
            self._chunks = []
            self.start = self.end


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's ``server_vad`` turn detection settings."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def event_fields(self) -> dict[str, Any]:
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }


@dataclass(frozen=True)
class Boundary:
    """Where server VAD opened or closed a turn (absolute samples); a turn closed for length is ``forced``."""

    kind: Literal["started", "stopped"]
    sample: int
    forced: bool = False


class TurnDetector:
    """Silero VAD over the audio as it arrives, window by window, with its recurrent state kept
    between chunks (the probabilities are those of the whole stream decoded at once); a turn
    opens where speech starts (less ``prefix_padding_ms``) and closes after ``silence_duration_ms``
    of silence, or once it is ``max_turn_samples`` long."""

    def __init__(self, settings: ServerVad, max_turn_samples: int, position: int, speaking_since: Optional[int] = None) -> None:
        import numpy as np

        self.settings = settings
        self.max_turn_samples = max_turn_samples
        self.position = position  # the first sample of the next window
        self.turn_start = speaking_since  # the open turn's first sample, if one is open
        self._silence_from: Optional[int] = None
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._state = (np.zeros((1, 1, 128), dtype=np.float32), np.zeros((1, 1, 128), dtype=np.float32))

    def feed(self, samples: np.ndarray, floor: int) -> list[Boundary]:
        """The turn boundaries in ``samples`` (the next ones after those fed); no turn starts before ``floor``."""
        import numpy as np

        audio = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        count = len(audio) // _WINDOW
        self._pending = audio[count * _WINDOW :].copy()
        if not count:
            return []
        windows = audio[: count * _WINDOW].reshape(count, _WINDOW)
        contexts = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT:]])
        self._context = windows[-1, -_CONTEXT:].copy()
        probabilities = self._probabilities(np.concatenate([contexts, windows], axis=1))
        s = self.settings
        prefix = s.prefix_padding_ms * SAMPLE_RATE // 1000
        silence = s.silence_duration_ms * SAMPLE_RATE // 1000
        quiet = max(s.threshold - 0.15, 0.01)  # Silero's own hysteresis (faster_whisper.vad)
        found: list[Boundary] = []
        for probability in probabilities:
            start, end = self.position, self.position + _WINDOW
            self.position = end
            if self.turn_start is None:
                if probability >= s.threshold:
                    self.turn_start = max(start - prefix, floor)
                    self._silence_from = None
                    found.append(Boundary("started", self.turn_start))
                continue
            if probability >= s.threshold:
                self._silence_from = None
            elif probability < quiet and self._silence_from is None:
                self._silence_from = start
            if self._silence_from is not None and end - self._silence_from >= silence:
                found.append(Boundary("stopped", end))
                self.turn_start = None
            elif end - self.turn_start >= self.max_turn_samples:
                found.append(Boundary("stopped", end, forced=True))
                self.turn_start = None
            if self.turn_start is None:
                floor = end
        return found

    def _probabilities(self, rows: np.ndarray) -> np.ndarray:
        from faster_whisper.vad import get_vad_model

        session = get_vad_model().session
        probabilities, h, c = session.run(None, {"input": rows, "h": self._state[0], "c": self._state[1]})
        self._state = (h, c)
        return probabilities.reshape(-1)


class Agreement:
    """Local agreement: the words two successive decodes of a growing turn agree on (from its
    start) are sent once, as a delta; a delta is never taken back, so words that a later decode
    changes are not sent again. The final decode sends what extends the words sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._previous: Optional[list[str]] = None

    def update(self, text: str) -> str:
        """The delta a new interim decode ``text`` allows ('' for none)."""
        words = text.split()
        previous, self._previous = self._previous, words
        if previous is None:
            return ""
        agreed = []
        for a, b in zip(previous, words, strict=False):
            if a != b:
                break
            agreed.append(a)
        return self._extend(agreed)

    def finish(self, text: str) -> str:
        """The last delta of the turn, from its final ``text`` ('' if the final text does not
        extend the words sent: the completed event carries the final text anyway)."""
        return self._extend(text.split())

    def _extend(self, words: list[str]) -> str:
        if len(words) <= len(self.sent) or words[: len(self.sent)] != self.sent:
            return ""
        piece = " ".join(words[len(self.sent) :])
        piece = " " + piece if self.sent else piece
        self.sent = list(words)
        return piece
