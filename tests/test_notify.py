"""Urgent notifications: --notify webhooks through the durable message outbox.

A real HTTP receiver (http.server in a thread) that fails, stalls and accepts as each test
scripts it; real phantom studies through the real model; a real ``ichscan batch`` process
SIGKILLed while its webhook is pending.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import Receiver, read_csv, start_ichscan, wait_for
from ichscan.cli import cli
from ichscan.default_plugins.notify import KIND, POSITIVE_EVENT, RESULT_EVENT, record_event
from ichscan.events import StudyResult
from ichscan.labels import LABELS
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.reporting import ResultsOutput
from ichscan.state import StateStore
from ichscan.state.messages import EVENT_ID_HEADER, SIGNATURE_HEADER, HttpDestination, MessageOutbox, MessageSender

SECRET = b"s3cret-for-tests"


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def verify(request: dict, secret: bytes = SECRET) -> bool:
    """What a receiver does: HMAC-SHA256 of the exact body bytes, compared in constant time."""
    expected = "sha256=" + hmac.new(secret, request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, request["headers"].get(SIGNATURE_HEADER, ""))


def deliveries(state: Path) -> list[tuple]:
    """``(event_id, destination, state, attempts)`` of every message delivery, read-only."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        return db.execute("SELECT event_id, destination, state, attempts FROM message_deliveries ORDER BY rowid").fetchall()
    finally:
        db.close()


def study_result(uid: str = "1.2.3", p_any: float = 0.1, threshold: float = 0.5, slices: int = 4) -> StudyResult:
    probabilities = {label: p_any / 2 for label in LABELS}
    probabilities["subdural"] = probabilities["any"] = p_any
    positive = {label: probabilities[label] >= threshold for label in LABELS}
    return StudyResult(
        study_instance_uid=uid, accession_number="ACC1", patient_id="PID-SECRET", study_date="20260101",
        probabilities=probabilities, positive=positive, thresholds={label: threshold for label in LABELS},
        top_label="subdural" if positive["any"] else "none", top_probability=p_any, slices=slices,
        positive_slices=slices if positive["any"] else 0, best_slice="/data/DOE^JANE/1.dcm", best_sop_instance_uid="1.2.3.4.5",
        best_series_instance_uid="1.2.3.4", overlay=None, model_name="simplecnn", model_version="demo", demo=True, source="watch",
    )


# -- the sender ------------------------------------------------------------------------------


def test_a_failing_then_stalling_receiver_gets_the_same_signed_event_until_it_accepts(tmp_path, receiver):
    hook = receiver(plan=[500, ("stall", 2.0), 503])
    destination = HttpDestination.parse(hook.url, token="tok", secret=SECRET)
    with StateStore(tmp_path / "state.sqlite") as store:
        event_id = MessageOutbox(store).enqueue(KIND, "1.2.3", "k1", b'{"x": 1}', "application/json", [destination])
        assert event_id is not None
        # The same content again (a restart completing the study again): nothing new.
        assert MessageOutbox(store).enqueue(KIND, "1.2.3", "k1", b'{"x": 1}', "application/json", [destination]) is None
        sender = MessageSender(store, [destination], min_backoff=0.05, max_backoff=0.2, timeout=0.5)
        sender.start()
        try:
            assert sender.drain(60) == 0
        finally:
            sender.stop()
            sender.join(10)
        (row,) = store.query("SELECT state, attempts, last_error FROM message_deliveries")
    assert row[0] == "sent" and row[1] == 0  # 5xx and timeouts are not refusals
    assert len(hook.requests) >= 4  # 500, the stalled one (timed out), 503, then 200
    assert set(hook.event_ids()) == {event_id}
    for request in hook.requests:
        assert request["body"] == b'{"x": 1}' and request["path"] == "/hook"
        assert request["headers"]["Idempotency-Key"] == event_id
        assert request["headers"]["Authorization"] == "Bearer tok"
        assert request["headers"]["Content-Type"] == "application/json"
        assert verify(request)
    assert not verify(hook.requests[0], b"another secret")


def test_a_refusing_receiver_is_given_up_and_tried_again_by_the_next_run(tmp_path, receiver):
    hook = receiver(then=404)
    destination = HttpDestination.parse(hook.url)
    with StateStore(tmp_path / "state.sqlite") as store:
        outbox = MessageOutbox(store)
        outbox.enqueue(KIND, "1.2.3", "k1", b"{}", "application/json", [destination])
        sender = MessageSender(store, [destination], min_backoff=0.01, max_backoff=0.05)
        sender.max_refusals = 3
        sender.start()
        try:
            assert sender.drain(60) == 0  # none pending: given up
        finally:
            sender.stop()
            sender.join(10)
        (row,) = store.query("SELECT state, attempts, last_error FROM message_deliveries")
        assert row[0] == "failed" and "HTTP 404" in row[2]
        assert len(hook.requests) == 3
        assert outbox.resume([KIND], [destination]) == 1  # one more round of tries
        assert outbox.resume(["fhir"], [destination]) == 0  # other kinds are others' business


def test_bad_notify_options_are_one_line_errors(tmp_path):
    (tmp_path / "in").mkdir()
    secret = tmp_path / "secret"
    secret.write_text("two words\n")
    for args, message in (
        (["--notify", "ftp://example.org/x"], "is not an http:// or https:// URL"),
        (["--notify", "https://user:pw@example.org/x"], "must not carry credentials"),
        (["--notify", "https://example.org/x", "--notify-secret-file", str(secret)], "must hold one secret"),
        (["--notify-token-file", str(secret)], "goes with --notify"),
        (["--notify", "https://example.org/x", "--notify-on", "sometimes"], "'sometimes' is not one of"),
    ):
        result = CliRunner().invoke(cli, ["batch", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


# -- which results make events -------------------------------------------------------------------


def test_positive_mode_sends_when_a_study_becomes_positive_and_all_mode_sends_every_new_result(tmp_path):
    destination = HttpDestination.parse("http://127.0.0.1:9/hook")
    with StateStore(tmp_path / "state.sqlite") as store:

        def sent(result: StudyResult, mode: str) -> str | None:
            return record_event(store, result, (destination,), mode)

        # positive: a negative study sends nothing; its revision that becomes positive sends one event.
        assert sent(study_result(p_any=0.2), "positive") is None
        assert sent(study_result(p_any=0.2), "positive") is None  # the same result again
        first = sent(study_result(p_any=0.8, slices=5), "positive")
        assert first is not None
        assert sent(study_result(p_any=0.9, slices=6), "positive") is None  # still positive
        assert sent(study_result(p_any=0.9, slices=6), "positive") is None
        assert sent(study_result(p_any=0.3, slices=7), "positive") is None  # negative again: not sent...
        again = sent(study_result(p_any=0.7, slices=8), "positive")  # ...positive again: sent
        assert again is not None and again != first
        rows = store.query(
            "SELECT m.event_id, m.revision, m.positive, COUNT(d.event_id) FROM messages m "
            "LEFT JOIN message_deliveries d USING (event_id) GROUP BY m.event_id ORDER BY m.revision"
        )
        assert [(r[1], r[2], r[3]) for r in rows] == [(1, 0, 0), (2, 1, 1), (3, 1, 0), (4, 0, 0), (5, 1, 1)]
        bodies = {r[0]: json.loads(bytes(b)) for r in rows for (b,) in [store.query_one("SELECT body FROM messages WHERE event_id = ?", (r[0],))]}
        assert bodies[first]["event"] == POSITIVE_EVENT and bodies[first]["revision"] == 2
        assert bodies[first]["previous_event_id"] is None
        assert bodies[again]["previous_event_id"] == first  # the previous one that was sent

        # all: every new result of another study is an event, each pointing to the one before.
        ids = [sent(study_result("1.2.4", p_any=p, slices=n), "all") for n, p in enumerate((0.1, 0.2, 0.8, 0.9), start=1)]
        assert None not in ids
        assert sent(study_result("1.2.4", p_any=0.9, slices=4), "all") is None
        events = [json.loads(bytes(store.query_one("SELECT body FROM messages WHERE event_id = ?", (i,))[0])) for i in ids]
        assert [e["event"] for e in events] == [RESULT_EVENT, RESULT_EVENT, POSITIVE_EVENT, RESULT_EVENT]
        assert [e["previous_event_id"] for e in events] == [None, *ids[:-1]]
    body = events[2]
    assert body["study_instance_uid"] == "1.2.4" and body["accession_number"] == "ACC1"
    assert body["positive"] is True and body["top_label"] == "subdural" and body["top_probability"] == 0.8
    assert set(body["probabilities"]) == set(LABELS) == set(body["positive_by_label"]) == set(body["thresholds"])
    assert body["demo"] is True and body["source"] == "watch" and body["model"] == {"name": "simplecnn", "version": "demo"}
    text = json.dumps(events)
    assert "PID-SECRET" not in text and "DOE" not in text and "20260101" not in text  # no patient ID, name, date


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(make_phantoms):
    return make_phantoms("notify", studies=2, slices=3, seed=23, size=64)


def screen(folder: Path, work: Path, thresholds: dict[str, float], **results) -> None:
    opts = BatchOptions(
        input_dir=folder, out=work / "results.csv", workers=0, progress=False, thresholds=thresholds,
        state=work / "state.sqlite", results=ResultsOutput(**results),
    )
    assert run_batch(opts).reporter_errors == {}


def test_batch_notifies_a_study_once_when_it_becomes_positive_without_patient_names(phantoms, tmp_path, receiver):
    import pydicom

    folder, records = phantoms
    names = {str(pydicom.dcmread(r.path, stop_before_pixels=True).PatientName) for r in records}
    assert names and all(names)  # the phantoms carry patient names...
    hook = receiver()
    notify = (HttpDestination.parse(hook.url, secret=SECRET),)
    # Run 1: nothing reaches the threshold: no event.
    screen(folder, tmp_path, {label: 1.0 for label in LABELS}, notify=notify, forward_wait=30)
    assert all(row["positive_slices"] == "0" and row["top_label"] == "none" for row in read_csv(tmp_path / "results_studies.csv"))
    assert hook.requests == []
    # Run 2, same state: every study is positive now, a revision of a negative result: one event each.
    screen(folder, tmp_path, {label: 0.0 for label in LABELS}, notify=notify, forward_wait=30, dicom_out=tmp_path / "dicom")
    studies = {row["study_instance_uid"]: row for row in read_csv(tmp_path / "results_studies.csv")}
    wait_for(lambda: len(hook.requests) >= 2, 30, "two events")
    bodies = hook.bodies()
    assert sorted(b["study_instance_uid"] for b in bodies) == sorted(studies)
    for request, body in zip(hook.requests, bodies):
        assert verify(request) and request["headers"][EVENT_ID_HEADER] == body["event_id"]
        assert body["event"] == POSITIVE_EVENT and body["revision"] == 2 and body["positive"] is True
        assert body["probabilities"]["any"] == pytest.approx(float(studies[body["study_instance_uid"]]["p_any"]), abs=1e-5)
        assert body["dicom_results"][0]["kind"] == "sr" and Path(body["dicom_results"][0]["file"]).is_file()
        assert body["overlay"] is not None and Path(body["overlay"]).is_file()
        text = request["body"].decode()
        assert not any(name in text for name in names)  # ...which never go out
        assert "Phantom" not in text and "patient" not in text.lower()
    # Run 3: the same results again: nothing new is sent.
    screen(folder, tmp_path, {label: 0.0 for label in LABELS}, notify=notify, forward_wait=30, dicom_out=tmp_path / "dicom")
    assert len(hook.requests) == 2
    assert {d[2] for d in deliveries(tmp_path / "state.sqlite")} == {"sent"}


def test_a_positive_studys_webhook_arrives_across_a_sigkill_and_a_restart_with_one_event_id(phantoms, tmp_path, receiver):
    folder, _ = phantoms
    hook = receiver(then=500)  # refuses until told otherwise
    state = tmp_path / "state.sqlite"
    args = (
        "batch", str(folder), "--out", str(tmp_path / "r.csv"), "--state", str(state), "--overlays-for", "none",
        "--workers", "0", "--no-progress", "--threshold", "any=0.0", "--notify", hook.url, "--forward-wait", "600",
    )
    first = start_ichscan(tmp_path / "first.log", *args)
    try:
        # Both studies' events recorded, and the receiver has refused at least one try.
        wait_for(lambda: hook.requests and len(deliveries(state)) == 2, 180, "the first attempts", first, tmp_path / "first.log")
        pending = deliveries(state)
        assert {d[2] for d in pending} == {"pending"}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    ids = {d[0] for d in pending}
    assert set(hook.event_ids()) <= ids  # what was tried before the crash was recorded first
    hook.then = 200
    second = start_ichscan(tmp_path / "second.log", *args)
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()
    accepted = [r["headers"][EVENT_ID_HEADER] for r in hook.requests]
    assert set(accepted) == ids  # every attempt, before and after the crash, under the same ids
    assert {d[0]: d[2] for d in deliveries(state)} == {i: "sent" for i in ids}
    by_study: dict[str, set[str]] = {}
    for body in hook.bodies():
        by_study.setdefault(body["study_instance_uid"], set()).add(body["event_id"])
        assert body["event"] == POSITIVE_EVENT and body["revision"] == 1
    assert len(by_study) == 2 and all(len(events) == 1 for events in by_study.values())  # one distinct id per study
