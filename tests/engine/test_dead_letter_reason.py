"""The reason a dead letter keeps: what the destination said, never "will retry", and what to do (pure)."""

from __future__ import annotations

from engine.workers import dead_letter_reason


def test_gave_up_drops_will_retry_and_says_replay() -> None:
    reason = "fhir-main POST /: cannot connect (All connection attempts failed); will retry"
    text = dead_letter_reason(reason, 5, block=True)
    assert text.startswith(
        "gave up after 5 attempts: fhir-main POST /: cannot connect (All connection attempts"
    )
    assert "will retry" not in text
    assert text.endswith("then replay: sluice replay --id <message id>")


def test_every_will_retry_form_goes() -> None:
    for reason, kept in [
        ("fhir-main POST /: HTTP 503 (will retry): down", "fhir-main POST /: HTTP 503: down"),
        ("x: HTTP 409 (version conflict, will retry): y", "x: HTTP 409 (version conflict): y"),
        ("x: TLS certificate verification failed (e); if the server uses a private CA set tls.ca_file, will retry",
         "x: TLS certificate verification failed (e); if the server uses a private CA set tls.ca_file"),
    ]:  # fmt: skip
        text = dead_letter_reason(reason, 1, block=False)
        assert text.startswith(f"parked at the first failure (on_failure: dead-letter): {kept};"), text


def test_a_refusal_keeps_the_receivers_words_and_says_replay() -> None:
    text = dead_letter_reason("receiver answered AE 207: Slot not available", 1, block=True, retryable=False)
    assert text == (
        "receiver answered AE 207: Slot not available; fix the cause, then replay: sluice replay --id <message id>"
    )
    said = "fhir-main POST /: HTTP 422 (rejected; fix the message or mapping, then replay): bad"
    assert dead_letter_reason(said, 1, block=True, retryable=False) == said  # already says what to do


def test_a_path_holding_the_word_replay_still_gets_the_hint() -> None:
    text = dead_letter_reason("cannot write /tmp/replay0/out/X.hl7: File exists", 2, block=True)
    assert text.endswith("then replay: sluice replay --id <message id>")


def test_the_hint_names_the_message_when_known() -> None:
    text = dead_letter_reason("x: cannot connect (refused); will retry", 2, block=True, message_id=1234)
    assert (
        text
        == "gave up after 2 attempts: x: cannot connect (refused); fix the cause (e.g. the target is up again), then replay: sluice replay --id 1234"
    )
