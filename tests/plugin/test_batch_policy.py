"""The engine's batching decisions, without threads or a model: which calls share the next pass,
when a pass waits for company, how an encode pass is split, and where the defaults live."""

from __future__ import annotations

import inspect

import pytest

from mlflow_faster_whisper import transcription
from mlflow_faster_whisper.batching import BatchPolicy
from mlflow_faster_whisper.engine import Ticket, _Call

ENCODE = ("encode", (80, 3000))
GREEDY = ("generate", (("beam_size", 1),))


def _call(key=ENCODE, windows=1, long=False, skips=0) -> _Call:
    return _Call(Ticket(long=long), key[0], key, windows, {}, skips=skips)


def test_a_pass_takes_the_first_call_and_those_with_its_key_up_to_batch_size_windows():
    policy = BatchPolicy(batch_size=4)
    a, b, other, c, d = _call(), _call(windows=2), _call(key=GREEDY), _call(), _call()
    assert policy.next_batch([a, b, other, c, d]) == [a, b, c]  # d would make 5 windows
    assert policy.next_batch([other, a, b]) == [other]  # a generate does not share an encode's pass
    assert policy.next_batch([]) == []


def test_short_requests_go_before_a_long_file_and_never_share_its_pass():
    policy = BatchPolicy(batch_size=8)
    long_window, short, short_too = _call(long=True), _call(), _call()
    batch = policy.next_batch([long_window, short, short_too])
    assert batch == [short, short_too]
    assert policy.passed_over([long_window, short, short_too], batch) == [long_window]


def test_a_call_passed_over_max_skips_times_goes_next():
    policy = BatchPolicy(max_skips=2)
    long_window, short = _call(long=True), _call()
    waiting = [long_window, short]
    for _ in range(policy.max_skips):
        batch = policy.next_batch(waiting)
        assert batch == [short]
        for call in policy.passed_over(waiting, batch):
            call.skips += 1
    assert long_window.skips == 2
    assert policy.next_batch(waiting) == [long_window]
    assert policy.passed_over(waiting, [long_window]) == []  # nothing older was left


def test_a_pass_waits_for_company_only_while_a_request_computes_and_it_is_not_full():
    policy = BatchPolicy(batch_size=4)
    assert policy.gathers(waiting_windows=1, computing=1)
    assert not policy.gathers(waiting_windows=1, computing=0)  # a lone request never waits
    assert not policy.gathers(waiting_windows=4, computing=3)  # full: go


def test_an_encode_pass_is_one_window_per_encoder_call_on_a_cpu_and_batched_on_a_gpu():
    policy = BatchPolicy(batch_size=4)
    assert policy.encoder_batch_size("cpu") == 1 and policy.encoder_batch_size("cuda") == 4
    assert policy.encoder_calls(3, "cpu") == [range(0, 1), range(1, 2), range(2, 3)]
    assert policy.encoder_calls(6, "cuda") == [range(0, 4), range(4, 6)]
    fixed = BatchPolicy(batch_size=4, encode_batch_size=2)
    assert fixed.encoder_calls(5, "cpu") == [range(0, 2), range(2, 4), range(4, 5)]
    assert fixed.encoder_batch_size("cuda") == 2


@pytest.mark.parametrize("values", [{"batch_size": 0}, {"encode_batch_size": 0}])
def test_sizes_below_one_are_refused(values):
    with pytest.raises(ValueError, match="at least 1"):
        BatchPolicy(**values)


def test_the_batched_long_form_pipeline_takes_the_policys_default_batch_size():
    default = BatchPolicy().batch_size
    for function in (transcription.transcribe, transcription.stream_segments):
        assert inspect.signature(function).parameters["batch_size"].default == default, function.__name__
