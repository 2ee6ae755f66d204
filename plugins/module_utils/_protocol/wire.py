# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host <-> agent wire protocol: framing, limits, schema and the allow-list of operations.

Standalone on purpose (standard library only, no imports of the collection or of Ansible): the
guest_agent role copies this file verbatim into every guest as part of the agent's library, and
the modules import it from the collection. Both ends therefore parse with the same code.

Messages are JSON objects, one per line, UTF-8, at most MAX_MESSAGE_BYTES including the newline.
Everything read from the other end is untrusted: parse_request (agent side) and
replies.parse_response (host side) enforce size, encoding, JSON, exact field sets and types before
anything looks inside. This module holds the framing, the checks both ends use and the requests;
replies.py the replies' schemas.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import typing as t

# 2: rotate and attest name the libvirt domain they ask (domain_uuid), and the attestation signs it.
PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 65536
MAX_HYPERVISOR_ENTROPY_BYTES = 4096
MIN_HYPERVISOR_ENTROPY_BYTES = 32
NONCE_BYTES = 32
HASH_KEY_BYTES = 32

OPERATIONS = ("hello", "rotate", "attest")
ROTATE_OPERATIONS = ("erase", "modify", "regenerate")
ENTROPY_SOURCES = ("guest", "hypervisor", "combined")
# In the order the agent rotates them: a provider whose secret is bound to the machine-id
# (systemd_credential, hostname) comes after machine_id and uses the new one.
PROVIDERS = ("identity", "ssh_host_keys", "machine_id", "rng", "tls", "hooks", "systemd_credential", "network_manager",
             "dhcp_client", "wireguard", "enrolment", "cloud_init", "hostname", "files")
PROVIDER_STATUSES = ("rotated", "erased", "unchanged", "failed")
PROVIDER_METHODS = ("hkdf", "regenerated", "erased", "reseeded")
# Optional field of a provider's outcome in a rotate result: the fingerprint names of secrets the
# provider found on the guest but did not change (rotate, modify, regenerate or erase), for example a
# host key of a type it cannot make. Such a secret stays in the attestation under its current
# fingerprint, so verify_unique still compares it with the golden's and the other clones'.
NOT_ROTATED = "not_rotated"
TRIGGERS = ("channel", "generation", "boot_uuid", "network", "session")
# What hello says of each guest-side trigger the agent knows (configured off, on, or on but not
# workable on this guest).
TRIGGER_STATES = ("on", "off", "unavailable")

_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# libvirt's UUIDString(): the canonical lowercase form (proof.DOMAIN_UUID_PATTERN).
_DOMAIN_UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_PATTERN = re.compile(r"[0-9a-f]+")
_MAX_ERROR_MESSAGE = 2048
# Characters that must never reach a terminal, a log or Ansible's output unescaped: C0/C1 controls,
# lone surrogates (not encodable as UTF-8), line/paragraph separators, bidirectional overrides, BOM.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` is the short code an error reply carries."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# ---------------------------------------------------------------------------------------------
# Framing


class OversizedLine:
    """Marker yielded by LineBuffer for a line longer than the limit (its bytes were dropped)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __repr__(self) -> str:
        return f"OversizedLine({self.length})"


class LineBuffer:
    """Split a byte stream into lines of at most ``limit`` bytes (newline included).

    A longer line is dropped as it arrives (memory stays bounded by ``limit``) and reported once
    as an :class:`OversizedLine`; reading resynchronises at the next newline.
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._discarding = 0

    def feed(self, data: bytes) -> list[bytes | OversizedLine]:
        """Add received bytes; return the complete lines (without newline) and oversize markers."""
        out: list[bytes | OversizedLine] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            chunk = data[start:end]
            if self._discarding:
                self._discarding += len(chunk)
            else:
                self._buffer += chunk
                if len(self._buffer) + 1 > self.limit:
                    self._discarding = len(self._buffer)
                    self._buffer = bytearray()
            if newline < 0:
                break
            if self._discarding:
                out.append(OversizedLine(self._discarding + 1))
                self._discarding = 0
            else:
                out.append(bytes(self._buffer))
                self._buffer = bytearray()
            start = newline + 1
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held (or being discarded)."""
        return self._discarding or len(self._buffer)


def _without_surrogates(value: t.Any) -> t.Any:
    """A copy of a JSON value whose strings (keys too) have every lone surrogate escaped as text."""
    if isinstance(value, str):
        return _SURROGATE.sub(_escape, value)
    if isinstance(value, dict):
        return {_without_surrogates(key): _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_surrogates(item) for item in value]
    return value


def encode_message(message: dict[str, t.Any]) -> bytes:
    """One message as a compact JSON line; ProtocolError if it exceeds the limit.

    Whatever text the message holds, the line is UTF-8: a string that is not valid Unicode (a lone
    surrogate, such as an undecodable file name or a value the other end sent as ``"\\udcff"``) is
    sent with the surrogate written out as the six characters ``\\udcff``, never as itself (which
    cannot be encoded) nor as a JSON escape (which the other end would decode back into it).
    """
    line = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        data = line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        line = json.dumps(_without_surrogates(message), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        data = line.encode("utf-8") + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return data


def _reject_constant(name: str) -> t.NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_object(pairs: list[tuple[str, t.Any]]) -> dict[str, t.Any]:
    result: dict[str, t.Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def decode_line(line: bytes | OversizedLine) -> dict[str, t.Any]:
    """Size, UTF-8 and JSON checks of one line (newline optional); returns the JSON object."""
    if isinstance(line, OversizedLine):
        raise ProtocolError("too_large", f"message of {line.length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    if not isinstance(line, (bytes, bytearray)):
        raise ProtocolError("bad_message", "a message must be bytes")
    if len(line) > MAX_MESSAGE_BYTES or (len(line) == MAX_MESSAGE_BYTES and not line.endswith(b"\n")):
        raise ProtocolError("too_large", f"message of {len(line)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    body = bytes(line[:-1]) if line.endswith(b"\n") else bytes(line)
    if b"\n" in body:
        raise ProtocolError("bad_message", "a message must be exactly one line")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError("bad_encoding", f"message is not UTF-8: {error.reason} at byte {error.start}") from None
    if not text.strip():
        raise ProtocolError("bad_json", "empty message")
    try:
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "message is nested too deeply") from None
    except ValueError as error:
        raise ProtocolError("bad_json", f"message is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ProtocolError("bad_message", f"a message must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Field checks (shared by both ends)


def _type_name(value: t.Any) -> str:
    return "null" if value is None else type(value).__name__


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int = _MAX_ERROR_MESSAGE) -> str:
    """``text`` fit for a terminal or Ansible's output: unprintable characters escaped, at most ``limit`` characters."""
    escaped = _UNPRINTABLE.sub(_escape, text[:limit])
    if len(text) > limit or len(escaped) > limit:
        escaped = escaped[: max(0, limit - 3)] + "..."
    return escaped


def shown(value: t.Any, limit: int = 64) -> str:
    """A value the other end sent, for an error message: strings escaped and cut, numbers as they are, else the type."""
    if isinstance(value, str):
        return printable(value, limit)
    if value is None or isinstance(value, (bool, int, float)):
        return printable(repr(value), limit)
    return _type_name(value)


def check_version(value: t.Any) -> bool:
    """Whether ``value`` is this protocol's version: the JSON integer itself (1.0 and true are not 1)."""
    return type(value) is int and value == PROTOCOL_VERSION  # pylint: disable=unidiomatic-typecheck


def check_fields(obj: t.Any, what: str, required: t.Iterable[str], optional: t.Iterable[str] = ()) -> dict:
    """``obj`` must be an object holding every required field and nothing outside required+optional."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"{what} must be an object, got {_type_name(obj)}")
    required = tuple(required)
    allowed = set(required) | set(optional)
    missing = [name for name in required if name not in obj]
    if missing:
        raise ProtocolError("bad_message", f"{what} lacks field(s): {', '.join(missing)}")
    extra = sorted(shown(name) for name in obj if name not in allowed)
    if extra:
        raise ProtocolError("bad_message", f"{what} has unknown field(s): {', '.join(extra[:8])}")
    return obj


def check_int(value: t.Any, what: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """A JSON integer (not a bool) within bounds."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProtocolError("bad_message", f"{what} must be an integer in [{minimum}, {maximum}]")
    return value


def check_str(
    value: t.Any, what: str, max_length: int = 4096, pattern: re.Pattern | None = None, free_text: bool = False
) -> str:
    """A string of bounded length, optionally matching ``pattern`` in full.

    Names, states and fingerprints must be printable (no control characters, lone surrogates,
    bidirectional overrides); ``free_text`` (error messages, details) may hold control
    characters, which whoever shows it escapes with :func:`printable`, but never lone surrogates.
    """
    if not isinstance(value, str) or len(value) > max_length:
        raise ProtocolError("bad_message", f"{what} must be a string of at most {max_length} characters")
    if (_SURROGATE if free_text else _UNPRINTABLE).search(value):
        raise ProtocolError("bad_message", f"{what} holds unprintable characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise ProtocolError("bad_message", f"{what} has an invalid format")
    return value


def check_hex(value: t.Any, what: str, length_bytes: int) -> str:
    """Lowercase hex of exactly ``length_bytes`` bytes."""
    if not isinstance(value, str) or len(value) != 2 * length_bytes or not _HEX_PATTERN.fullmatch(value):
        raise ProtocolError("bad_message", f"{what} must be {2 * length_bytes} lowercase hex characters ({length_bytes} bytes)")
    return value


def check_base64(value: t.Any, what: str, min_bytes: int = 0, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Standard padded base64; returns the decoded bytes."""
    if not isinstance(value, str) or len(value) > 4 * (max_bytes // 3 + 1):
        raise ProtocolError("bad_message", f"{what} must be a base64 string of at most {max_bytes} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError("bad_message", f"{what} is not valid base64") from None
    if not min_bytes <= len(raw) <= max_bytes:
        raise ProtocolError("bad_message", f"{what} must decode to {min_bytes}..{max_bytes} bytes, got {len(raw)}")
    return raw


def check_request_id(value: t.Any) -> str:
    """A request id: 1-64 characters from [A-Za-z0-9_-]."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise ProtocolError("bad_id", "id must be 1-64 characters from [A-Za-z0-9_-]")
    return value


# ---------------------------------------------------------------------------------------------
# Requests (built by the host, parsed by the agent)


def _check_rotate_args(args: dict[str, t.Any]) -> None:
    check_fields(args, "rotate args", ("operation", "nonce", "hash_key", "domain_uuid", "entropy_source"), ("providers", "entropy"))
    if args["operation"] not in ROTATE_OPERATIONS:
        raise ProtocolError("bad_args", f"operation must be one of {', '.join(ROTATE_OPERATIONS)}")
    check_hex(args["nonce"], "nonce", NONCE_BYTES)
    check_hex(args["hash_key"], "hash_key", HASH_KEY_BYTES)
    check_str(args["domain_uuid"], "domain_uuid", 36, _DOMAIN_UUID_PATTERN)
    if args["entropy_source"] not in ENTROPY_SOURCES:
        raise ProtocolError("bad_args", f"entropy_source must be one of {', '.join(ENTROPY_SOURCES)}")
    if "providers" in args:
        providers = args["providers"]
        if not isinstance(providers, list) or not providers or len(providers) > len(PROVIDERS):
            raise ProtocolError("bad_args", f"providers must be a non-empty list of at most {len(PROVIDERS)} names")
        for name in providers:
            if name not in PROVIDERS:
                raise ProtocolError("bad_args", f"unknown provider {str(name)[:64]!r}: use {', '.join(PROVIDERS)}")
        if len(set(providers)) != len(providers):
            raise ProtocolError("bad_args", "providers lists a name twice")
    needs_entropy = args["entropy_source"] in ("hypervisor", "combined")
    if needs_entropy and "entropy" not in args:
        raise ProtocolError("bad_args", f"entropy_source {args['entropy_source']} needs entropy")
    if not needs_entropy and "entropy" in args:
        raise ProtocolError("bad_args", "entropy is only allowed with entropy_source hypervisor or combined")
    if needs_entropy:
        check_base64(args["entropy"], "entropy", MIN_HYPERVISOR_ENTROPY_BYTES, MAX_HYPERVISOR_ENTROPY_BYTES)


def _check_attest_args(args: dict[str, t.Any]) -> None:
    check_fields(args, "attest args", ("nonce", "hash_key", "domain_uuid"))
    check_hex(args["nonce"], "nonce", NONCE_BYTES)
    check_hex(args["hash_key"], "hash_key", HASH_KEY_BYTES)
    check_str(args["domain_uuid"], "domain_uuid", 36, _DOMAIN_UUID_PATTERN)


_ARG_CHECKS: dict[str, t.Callable[[dict[str, t.Any]], None]] = {
    "hello": lambda args: check_fields(args, "hello args", ()),
    "rotate": _check_rotate_args,
    "attest": _check_attest_args,
}


def validate_request(message: dict[str, t.Any]) -> dict[str, t.Any]:
    """Schema check of a decoded request; ProtocolError carries the id when one could be read."""
    request_id = None
    if isinstance(message.get("id"), str) and _ID_PATTERN.fullmatch(message["id"]):
        request_id = message["id"]
    try:
        check_fields(message, "request", ("v", "id", "op", "args"))
        if not check_version(message["v"]):
            raise ProtocolError("bad_version", f"protocol version {shown(message['v'], 16)} is not supported (this end speaks {PROTOCOL_VERSION})")
        check_request_id(message["id"])
        if message["op"] not in OPERATIONS:
            raise ProtocolError("unknown_op", f"operation {str(message['op'])[:64]!r} is not allowed: use {', '.join(OPERATIONS)}")
        if not isinstance(message["args"], dict):
            raise ProtocolError("bad_args", "args must be an object")
        try:
            _ARG_CHECKS[message["op"]](message["args"])
        except ProtocolError as error:
            raise ProtocolError("bad_args", error.message) from None
    except ProtocolError as error:
        error.request_id = request_id
        raise
    return message


def parse_request(line: bytes | OversizedLine) -> dict[str, t.Any]:
    """Decode and validate one request line (agent side)."""
    return validate_request(decode_line(line))


def make_request(op: str, args: dict[str, t.Any], request_id: str) -> dict[str, t.Any]:
    """A request object, validated exactly as the agent will validate it."""
    return validate_request({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args})


def encode_request(op: str, args: dict[str, t.Any], request_id: str) -> bytes:
    """A request as a line, ready to write to the channel."""
    return encode_message(make_request(op, args, request_id))
