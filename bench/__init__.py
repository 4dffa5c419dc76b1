"""Benchmarks of mlflow-faster-whisper on real weights: ``python -m bench`` (``make bench``).

Sections (``--only NAME`` runs one; see ``python -m bench --help``):

* ``single``: one request at a time, raw ``faster_whisper.WhisperModel.transcribe`` vs the pyfunc
  ``predict`` vs the bento over HTTP, interleaved, same model, options and threads.
* ``concurrency``: 1, 8 and 32 clients against the bento (the decoding engine) vs the same requests
  decoded one after the other by raw faster-whisper and vs one batched-pipeline call over them all.
* ``quantization``: artifact size, size / float32 checkpoint, RTF and WER/CER per quantization.
* ``conversion``: wall time and peak RSS of ``log_model`` per quantization, one fresh process per run.
* ``service``: cold start to ``/readyz`` and RSS growth over 1000 requests.

Results go to ``bench/results/`` as JSON; ``BENCHMARKS.md`` is rendered from them.
"""
