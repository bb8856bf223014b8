"""Inputs the fuzzers found (benchmarks/fuzz/, docs/development.md#fuzzing), each through the
entry point its harness calls, with the row, status or error it must now give.

Each input under ``tests/data/fuzz/<harness>/`` is the fuzzer's own, minimised. The harness's
input layout is rebuilt here (a few lines each) so that these tests need no atheris.
"""

from __future__ import annotations

import io
import json
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContextTuple

from helpers import stow_fuzz_request
from ichscan.sources.scp import CANNOT_UNDERSTAND, CT_IMAGE_STORAGE, StoreHandler, decodable_transfer_syntaxes
from ichscan.sources.stow import StowOptions, start_stow_server
from ichscan.train.dataset import LabelsError, read_rsna_labels

DATA = Path(__file__).resolve().parent / "data" / "fuzz"


def fuzz_input(harness: str, name: str) -> bytes:
    return (DATA / harness / name).read_bytes()


# -- cstore: StoreHandler with a pynetdicom C-STORE event ----------------------------------------


def store_event(data: bytes, sop_class: str = CT_IMAGE_STORAGE, sop_instance: str = "1.2.3.4") -> Event:
    """benchmarks/fuzz/cstore.py's event: byte 0 picks the transfer syntax, the rest is the data set."""
    syntaxes = decodable_transfer_syntaxes()
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_instance
    request.DataSet = io.BytesIO(data[1:])
    context = PresentationContextTuple(1, UID(CT_IMAGE_STORAGE), syntaxes[data[0] % len(syntaxes)])
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZ", address="127.0.0.1"))
    return Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context})


def test_cstore_element_that_cannot_be_decoded_is_cannot_understand(tmp_path, caplog):
    # SOPInstanceUID with the unknown VR 'U\0': pydicom raises NotImplementedError when the
    # handler reads it; the handler let it escape (pynetdicom then answered 0xC211 with a
    # traceback in the log).
    stored = []
    handler = StoreHandler(tmp_path, stored.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = handler(store_event(fuzz_input("cstore", "unknown-vr-sop-instance-uid.bin")))
    assert status == CANNOT_UNDERSTAND
    assert not stored and not any(tmp_path.iterdir())
    assert handler.stats.refused == 1
    assert "SOPInstanceUID cannot be decoded" in caplog.text


# -- stow: a real STOW-RS receiver, the request the harness builds --------------------------------


def post_raw(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def stow_port(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    server = start_stow_server(StowOptions(port=0), StoreHandler(store, lambda path: None))
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_stow_part_with_an_empty_element_of_unknown_vr_is_refused_not_dropped(stow_port):
    # PatientBirthDate with VR 'D7' and length 0: pydicom keeps it raw with the value None, the
    # mark of a deferred read, and so decoded it (and raised) in the truncation check's walk over
    # the raw elements; the exception left do_POST and the client got no answer at all.
    status, body = post_raw(stow_port, stow_fuzz_request(fuzz_input("stow", "unknown-vr-empty-element.bin")))
    assert status == 409
    failed = json.loads(body)["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in failed] == [[CANNOT_UNDERSTAND]]



def test_stow_boundary_over_256_characters_is_a_bad_request(stow_port):
    # python-multipart refuses a boundary over 256 characters in MultipartParser's constructor
    # with FormParserError, which the receiver did not catch: the client got no answer.
    status, body = post_raw(stow_port, stow_fuzz_request(fuzz_input("stow", "boundary-over-256.bin")))
    assert status == 400
    assert b"the multipart boundary is" in body and b"over 256" in body


# -- labels: read_rsna_labels on the file ---------------------------------------------------------


def test_labels_not_utf8_is_a_labels_error(tmp_path):
    # Bytes that are not UTF-8 raised UnicodeDecodeError: no file, no line, and not the
    # LabelsError read_rsna_labels documents.
    path = tmp_path / "stage_2_train.csv"
    path.write_bytes(fuzz_input("labels", "not-utf8.csv"))
    with pytest.raises(LabelsError, match=r"stage_2_train.csv: not UTF-8 text \(after line \d+\)"):
        read_rsna_labels(path)


# -- rules: load_rules on the file, then what 'ichscan rules show --rules FILE' prints ------------


@pytest.mark.parametrize("name", ["float-digits.toml", "control-character.toml"])
def test_rules_show_prints_rules_that_read_back_the_same(tmp_path, name):
    # Written by hand while writing the rules harness, whose round-trip check fails on both
    # (the fuzzer itself did not reach them): 'rules show' printed 0.1234567 as 0.123457
    # (another rule), and a DEL in a pattern raw into a TOML literal string (a file that no
    # longer loads).
    from ichscan.rules import load_rules, parse_rules, to_toml

    path = tmp_path / name
    path.write_bytes(fuzz_input("rules", name))
    rules = load_rules(path)
    assert parse_rules(to_toml(rules)).rules == rules.rules


def test_rules_error_quoting_a_control_character_stays_one_line(tmp_path):
    # Found by the rules fuzzer: re.error repeats the pattern, so a CR in it (a TOML "\\r")
    # split the RulesError that 'ichscan rules check' prints over two lines.
    from ichscan.rules import RulesError, load_rules

    path = tmp_path / "rules.toml"
    path.write_bytes(fuzz_input("rules", "regex-error-with-cr.toml"))
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    message = str(caught.value)
    assert "\r" not in message and "\n" not in message
    assert message.endswith("other is not a valid regular expression: unknown extension ?<\\r at position 1")


def test_rules_nested_too_deeply_is_a_rules_error(tmp_path):
    # Written by hand while the campaign ran (its rules fuzzer, 1.8 million inputs, did not
    # nest this deep): tomllib recurses once per nested array, so 2,000 '[' raised
    # RecursionError out of load_rules, a traceback from 'ichscan rules check'.
    from ichscan.rules import RulesError, load_rules

    path = tmp_path / "rules.toml"
    path.write_bytes(fuzz_input("rules", "nested-arrays.toml"))
    with pytest.raises(RulesError, match="rules.toml: not valid TOML: arrays or tables nested too deeply$"):
        load_rules(path)
