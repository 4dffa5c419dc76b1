"""Where a short clip's time goes inside faster-whisper, at batch 1 and batched.

Times CTranslate2's two calls directly on the same 30 s mel windows: ``encode`` (a window costs
the same however short the speech in it: faster-whisper pads every window to 3000 frames) and
``generate`` (beam search). If the encoder dominates and its per-window cost does not drop when
windows are batched, batching short requests cannot raise throughput much on CPU.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import BEAM_SIZE, summary


def breakdown(model, audios: list[np.ndarray], batch: int, reps: int) -> dict[str, Any]:
    """Per-window seconds of encode and generate at batch 1 and at ``batch``.

    Args:
        model: a ``faster_whisper.WhisperModel``.
        audios: 16 kHz samples of short clips (cycled to fill the batch).
        batch: the batched size to compare with batch 1.
        reps: timed repetitions (medians reported).
    """
    from faster_whisper.tokenizer import Tokenizer

    frames = model.feature_extractor.nb_max_frames
    feats = []
    started = time.perf_counter()
    for audio in audios:
        mel = model.feature_extractor(audio)
        feats.append(np.pad(mel, ((0, 0), (0, max(0, frames - mel.shape[-1]))))[:, :frames])
    features_s = (time.perf_counter() - started) / len(audios)
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=False)
    out: dict[str, Any] = {"features_s_per_clip": features_s, "batch": batch}
    for size in (1, batch):
        stacked = np.stack([feats[i % len(feats)] for i in range(size)]).astype(np.float32)
        encode_times, generate_times = [], []
        for _ in range(reps + 1):  # the first is a warm-up
            started = time.perf_counter()
            encoded = model.encode(stacked)
            encode_times.append((time.perf_counter() - started) / size)
            started = time.perf_counter()
            model.model.generate(encoded, [prompt] * size, beam_size=BEAM_SIZE, max_length=224,
                                 suppress_blank=True, suppress_tokens=[-1])
            generate_times.append((time.perf_counter() - started) / size)
        out[f"batch_{size}"] = {"encode_s_per_window": summary(encode_times[1:]),
                                "generate_s_per_window": summary(generate_times[1:])}
    one, many = out["batch_1"], out[f"batch_{batch}"]
    per_one = one["encode_s_per_window"]["median"] + one["generate_s_per_window"]["median"]
    per_many = many["encode_s_per_window"]["median"] + many["generate_s_per_window"]["median"]
    per_engine = one["encode_s_per_window"]["median"] + many["generate_s_per_window"]["median"]
    out["encoder_share_batch_1"] = one["encode_s_per_window"]["median"] / per_one
    out["batching_speedup_bound"] = per_one / per_many  # throughput gain if only these calls mattered
    out["engine_speedup_bound"] = per_one / per_engine  # encoder window by window, generate batched (the engine on CPU)
    return out
