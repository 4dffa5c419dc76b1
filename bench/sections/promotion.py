"""Live promotion: alias move -> first answer by the new version (poll and webhook), production
latency during a swap, and production latency with a shadow candidate at 0, 0.1 and 1.0 of the
traffic against no shadow, all in one run.

One ``mlflow server`` (sqlite backend, webhooks on) holds two versions of whisper-tiny.en (the same
CTranslate2 files logged twice: a move imports, verifies, loads and warms the other copy), served
int8 by ``bentoml serve`` on the registry alias. Two clients post a 3 s real clip, each waiting a
random 0.5-2 s between requests, so production has idle time a shadow may use. Moves: the
service polls every 1 s, or polls every 600 s and takes MLflow's signed webhook; the alias flips
between the versions, and each move is timed from ``set_registered_model_alias`` to the first
answer by the new version. Latency "during a swap" is that of the requests that ended between a
move and 2 s after the new version's first answer; "steady" of those in 15 s with no move. Shadow:
one server per configuration, the order rotated every repetition, the same number of requests
each; p50/p99 over every repetition's requests.
"""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from typing import Any

from bench.common import WORK, log, ratio, summary
from bench.server import BentoServer, ServiceUnavailable, service_code_present
from devkit.processes import mlflow_server

NAME = "bench-promotion"
CLIP = "quick_brown_fox"
SECRET = "bench-webhook-secret"
THINK_S = (0.5, 2.0)  # a client's pause between requests: production has idle time a shadow may use
CLIENTS = 2


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    full = settings.mode == "full"
    moves, shadow_requests, shadow_reps = (4, 40, 2) if full else (2, 8, 1)
    root = WORK / "promotion"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from devkit import real

    audio = (next(c for c in real.speech_clips(["en"]) if c.name == CLIP)).path.read_bytes()
    results: dict[str, Any] = {"model": "tiny_en", "compute_type": "int8", "clip": f"en/{CLIP}", "clients": CLIENTS,
                               "think_s": THINK_S, "cpu_threads": settings.cpu_threads}
    with mlflow_server(root / "mlflow", webhooks=True) as url:
        client = _register(url, real.whisper_tiny_en_ct2())
        try:
            results["moves"] = {mode: _moves(settings, url, client, audio, mode, moves) for mode in ("poll", "webhook")}
            results["shadow"] = _shadow(settings, url, audio, shadow_requests, shadow_reps)
        except ServiceUnavailable as exc:
            log("promotion: skipped: %s", str(exc).splitlines()[0])
            return {**results, "skipped": f"bento service did not start: {exc}"}
    return results


def _register(url: str, ct2_dir):
    from devkit.registry import log_versions

    client = log_versions(url, ct2_dir, NAME, 2, experiment="bench-promotion")
    client.set_registered_model_alias(NAME, "production", "1")
    client.set_registered_model_alias(NAME, "staging", "2")
    return client


def _server(settings, url: str, log_name: str, **args: str) -> BentoServer:
    return BentoServer(f"models:/{NAME}@production", cpu_threads=settings.cpu_threads, log_name=log_name,
                       extra_args=args, env={"MLFLOW_TRACKING_URI": url, "WHISPER_WEBHOOK_SECRET": SECRET})


def _moves(settings, url: str, client, audio: bytes, mode: str, moves: int) -> dict[str, Any]:
    args = {"follow_interval_s": "1"} if mode == "poll" else {"follow_interval_s": "600",
                                                              "webhook_secret": "env:WHISPER_WEBHOOK_SECRET"}
    client.set_registered_model_alias(NAME, "production", "1")
    server = _server(settings, url, f"promotion-moves-{mode}", **args)
    server.start()
    webhook = None
    try:
        if mode == "webhook":
            webhook = client.create_webhook(name="bench", url=f"{server.url}/webhooks/mlflow",
                                            events=["model_version_alias.created"], secret=SECRET)
        with _Clients(server.url, audio) as clients:
            clients.wait_for(lambda a: True)
            steady_from = time.monotonic()
            time.sleep(15)
            steady = [a for a in clients.answers if a.ended > steady_from]
            seconds, during = [], []
            version = "1"
            for i in range(moves):
                version = "2" if version == "1" else "1"
                log("promotion: %s move %d/%d -> version %s", mode, i + 1, moves, version)
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "production", version)
                first = clients.wait_for(lambda a, v=version, t=moved: a.version == v and a.ended > t, timeout=300)
                seconds.append(first.ended - moved)
                time.sleep(2)
                during += [a for a in clients.answers if moved < a.ended <= first.ended + 2]
                time.sleep(3)
        failed = [a for a in clients.answers if a.status != 200]
    finally:
        if webhook is not None:
            client.delete_webhook(webhook.webhook_id)
        server.stop()
    log("promotion: %s moves %s s", mode, [round(s, 2) for s in seconds])
    return {"follow_interval_s": float(args["follow_interval_s"]), "move_to_first_answer_s": summary(seconds),
            "requests": len(clients.answers), "failed": len(failed),
            "latency_steady_s": _percentiles([a.seconds for a in steady]),
            "latency_during_swap_s": _percentiles([a.seconds for a in during])}


def _shadow(settings, url: str, audio: bytes, requests: int, reps: int) -> dict[str, Any]:
    configs: dict[str, dict[str, str]] = {"no_shadow": {}}
    for fraction in ("0", "0.1", "1.0"):
        configs[f"shadow_{fraction}"] = {"shadow": f"models:/{NAME}@staging", "shadow_fraction": fraction,
                                         "shadow_report_every": "1000"}
    latencies: dict[str, list[float]] = {name: [] for name in configs}
    shadowed: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            log("promotion: %s, repetition %d/%d", name, rep + 1, reps)
            server = _server(settings, url, f"promotion-{name}-{rep}", follow_interval_s="0", **configs[name])
            server.start()
            try:
                with _Clients(server.url, audio) as clients:
                    clients.wait_for(lambda a: True)  # the first answer is a warm-up
                    started = time.monotonic()
                    clients.wait_count(requests, after=started)
                latencies[name] += [a.seconds for a in clients.answers if a.ended > started][:requests]
                shadow = _settled_shadow(server)
                shadowed[name].append(shadow.get("figures") or {})
            finally:
                server.stop()
    base = _percentiles(latencies["no_shadow"])
    out = {}
    for name in names:
        p = _percentiles(latencies[name])
        figures = shadowed[name]
        out[name] = {**p, "p50_vs_no_shadow": ratio(p["p50"], base["p50"]), "p99_vs_no_shadow": ratio(p["p99"], base["p99"]),
                     "shadow_decoded": sum(f.get("requests", 0) for f in figures),
                     "shadow_dropped": sum(f.get("dropped", 0) for f in figures),
                     "shadow_agreement": [f.get("agreement") for f in figures if f]}
    return out


def _settled_shadow(server: BentoServer, timeout: float = 120) -> dict[str, Any]:
    """/info's shadow block once no shadow work is pending (done, or dropped past shadow_max_wait_s)."""
    deadline = time.monotonic() + timeout
    while True:
        shadow = server.info().get("shadow") or {}
        if not shadow.get("pending") or time.monotonic() > deadline:
            return shadow
        time.sleep(0.5)


def _percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]  # nearest rank
    return {"n": len(values), "p50": statistics.median(values), "p99": p99, "max": ordered[-1]}


class _Answer:
    __slots__ = ("ended", "seconds", "status", "version")

    def __init__(self, ended: float, seconds: float, status: int, version: str):
        self.ended, self.seconds, self.status, self.version = ended, seconds, status, version


class _Clients:
    """``CLIENTS`` threads posting the clip, each pausing a random ``THINK_S`` between requests."""

    def __init__(self, url: str, audio: bytes):
        self.url, self.audio = url, audio
        self.answers: list[_Answer] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, seed: int) -> None:
        import httpx

        pause = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=300) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    r = http.post("/transcribe", files={"file": ("clip.wav", self.audio, "audio/wav")})
                    status, version = r.status_code, r.headers.get("x-whisper-model-version", "")
                except Exception as exc:  # a dropped connection is a failed request too
                    status, version = 0, repr(exc)
                ended = time.monotonic()
                self.answers.append(_Answer(ended, ended - started, status, version))
                self.stop.wait(pause.uniform(*THINK_S))

    def wait_for(self, match, timeout: float = 300) -> _Answer:
        """The first answer ``match`` accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((a for a in list(self.answers) if match(a)), None)
            if hit is not None:
                return hit
            time.sleep(0.05)
        raise ServiceUnavailable(f"no expected answer within {timeout} s (last statuses: "
                                 f"{[a.status for a in self.answers[-5:]]})")

    def wait_count(self, count: int, after: float, timeout: float = 900) -> None:
        """Until ``count`` answers ended after ``after``."""
        deadline = time.monotonic() + timeout
        while sum(a.ended > after for a in list(self.answers)) < count:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"fewer than {count} answers within {timeout} s")
            time.sleep(0.05)

    def __enter__(self) -> "_Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)
