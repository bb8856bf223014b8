"""DICOMweb as a client: base URLs, bearer tokens, the client, and one-line error messages.

``ichscan pull URL`` (QIDO-RS, WADO-RS; :mod:`ichscan.sources.dicomweb`) and ``--forward
URL`` (STOW-RS; :mod:`ichscan.state.forwarder`) share what is here. The HTTP itself is
``dicomweb-client``'s (a ``requests`` session); this module only checks the URL, adds the
token and turns what can go wrong into a sentence that names the server.

A token never goes into a URL (URLs end up in logs and in the state file): it is read
from a file (``--forward-token-file``, ``pull --token-file``) and sent as
``Authorization: Bearer <token>``. A URL with credentials in it is refused.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

#: Seconds to wait for a DICOMweb server to accept a connection, and to send more of its answer.
HTTP_TIMEOUT = (10.0, 60.0)
#: The largest token file we read (a JWT is a few KB).
_MAX_TOKEN_BYTES = 64 * 1024


def is_web_url(text: str) -> bool:
    """Whether ``text`` is meant as a DICOMweb URL (``http://`` or ``https://``)."""
    return text.lower().startswith(("http://", "https://"))


def parse_base_url(text: str) -> str:
    """The DICOMweb base URL, checked and without a trailing slash; raises ValueError.

    Refused: other schemes, no host, credentials (``user:password@``), a query or a
    fragment (a token in the URL would land in logs and the state file).
    """
    if not is_web_url(text):
        raise ValueError(f"{text!r} is not an http:// or https:// URL (e.g. http://pacs.example.org:8042/dicom-web)")
    parts = urllib.parse.urlsplit(text)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(
            "a DICOMweb URL must not carry credentials (user:password@); put a bearer token in a file "
            "and give it with --forward-token-file (pull: --token-file)"
        )
    if parts.query or parts.fragment or text.rstrip().endswith(("?", "#")):
        raise ValueError(f"a DICOMweb base URL has no query or fragment: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port in {text!r} is not a number in 1-65535") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"{text!r} has no host (e.g. http://pacs.example.org:8042/dicom-web)")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in text):
        raise ValueError(f"{text!r} contains white space or control characters")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class WebDestination:
    """A STOW-RS target: a DICOMweb base URL (``str()`` is the URL, which the state file
    keys deliveries by). The token is not part of its identity and never printed."""

    url: str
    token: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @classmethod
    def parse(cls, text: str, token: str | None = None) -> WebDestination:
        return cls(parse_base_url(text), token)


def read_token(path: str | os.PathLike[str], what: str = "token") -> str:
    """The bearer token in ``path`` (one line, surrounding white space dropped); raises ValueError.

    ``what`` names it in the messages (``"secret"`` for ``--notify-secret-file``).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_TOKEN_BYTES:
        raise ValueError(f"{what} file {path} is larger than {_MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not ASCII text") from None
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError(f"{what} file {path} must hold one {what}: printable characters, no spaces")
    return token


def make_client(url: str, token: str | None = None, *, retry: bool = True) -> DICOMwebClient:
    """A ``dicomweb-client`` client for the base URL, with the bearer token and our timeouts.

    ``retry``: dicomweb-client's own retries of HTTP 408/429/503/504 (a few, seconds
    apart); the forwarder turns them off, as its outbox retries on its own schedule.
    """
    from dicomweb_client import DICOMwebClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = DICOMwebClient(url, headers=headers, timeout=HTTP_TIMEOUT)
    if not retry:
        client.set_http_retry_params(retry=False)
    return client


def stored_by_stow(answer: Any, sop_instance_uid: str) -> str:
    """Whether a STOW-RS answer (the response data set) says the instance was stored:
    ``""`` if so, else the reason. An empty answer to a 2xx request counts as stored."""
    failed = [item for item in answer.get("FailedSOPSequence", []) or [] if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid]
    if failed:
        reason = failed[0].get("FailureReason")
        return f"the server refused the object (STOW-RS failure reason 0x{int(reason):04X})" if reason is not None else "the server refused the object"
    stored = answer.get("ReferencedSOPSequence", None)
    if stored is not None and sop_instance_uid not in {str(item.get("ReferencedSOPInstanceUID", "")) for item in stored}:
        return "the STOW-RS answer does not list the object as stored"
    return ""


class DicomWebError(Exception):
    """A DICOMweb request failed; the message is one line that names the server.

    ``retry`` is True for what may pass by itself (the server unreachable, busy, or
    refusing our token, which someone may fix), False for a refusal of this request.
    ``status`` is the HTTP status, 0 without an answer.
    """

    def __init__(self, message: str, *, retry: bool, status: int = 0):
        super().__init__(message)
        self.retry = retry
        self.status = status


def explain(exc: BaseException, url: str, what: str) -> DicomWebError:
    """``exc`` from a request to the server at ``url`` (``what``: e.g. "QIDO-RS") as a
    :class:`DicomWebError` with a one-line message."""
    import requests

    if isinstance(exc, DicomWebError):
        return exc
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        reason = exc.response.reason or ""
        if status == 401:
            return DicomWebError(
                f"{url} refused {what} with HTTP 401 Unauthorized: give a valid bearer token "
                "(--forward-token-file; pull: --token-file)",
                retry=True,
                status=status,
            )
        if status == 403:
            return DicomWebError(f"{url} refused {what} with HTTP 403 Forbidden: the token lacks the permission", retry=True, status=status)
        if status in (400, 404, 405, 406, 415):
            # A web server's root, or Orthanc's own REST API, answers a DICOMweb path like this.
            return DicomWebError(
                f"{url} does not answer {what} (HTTP {status} {reason}): is it the DICOMweb base URL, "
                "e.g. http://host:8042/dicom-web?",
                retry=status in (404, 405, 406),
                status=status,
            )
        retry = status >= 500 or status in (408, 429)
        return DicomWebError(f"{url} answered {what} with HTTP {status} {reason}".rstrip(), retry=retry, status=status)
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomWebError(f"cannot reach {url}: TLS failed: {_first_line(exc)}", retry=True)
    if isinstance(exc, requests.ConnectionError):
        return DicomWebError(f"cannot reach {url}: {_connection_reason(exc)}", retry=True)
    if isinstance(exc, requests.Timeout):
        return DicomWebError(f"{url} did not answer {what} within {HTTP_TIMEOUT[1]:.0f} s", retry=True)
    if isinstance(exc, requests.RequestException) and not isinstance(exc, ValueError):  # JSON errors: below
        return DicomWebError(f"{what} to {url} failed: {_first_line(exc)}", retry=True)
    # dicomweb-client parses what came back: JSON that is not DICOM JSON, a multipart
    # body that is not DICOM, a non-JSON page (an HTML login page, a web server's index).
    return DicomWebError(
        f"{url} did not answer {what} as a DICOMweb server does ({type(exc).__name__}: {_first_line(exc)}); "
        "is it the DICOMweb base URL, e.g. http://host:8042/dicom-web?",
        retry=False,
    )


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out", "Temporary failure in name resolution"):
        if known in text:
            return known.lower()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
