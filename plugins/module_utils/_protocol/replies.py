# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's replies on the wire: how the agent builds them and how the host checks them.

Like wire.py, standalone on purpose (the standard library and wire.py only, imported relatively):
the guest_agent role copies this file verbatim into every guest next to wire.py, and the modules
import it from the collection. A reply is untrusted by the host: parse_response enforces size,
encoding, JSON, depth, exact field sets and types before anything looks inside.
"""

from __future__ import annotations

import re
import typing as t

from .wire import (
    ENTROPY_SOURCES,
    NONCE_BYTES,
    NOT_ROTATED,
    OversizedLine,
    PROTOCOL_VERSION,
    PROVIDER_METHODS,
    PROVIDER_STATUSES,
    ProtocolError,
    ROTATE_OPERATIONS,
    TRIGGERS,
    TRIGGER_STATES,
    _DOMAIN_UUID_PATTERN,
    _MAX_ERROR_MESSAGE,
    _SURROGATE,
    _escape,
    check_fields,
    check_hex,
    check_int,
    check_str,
    check_version,
    decode_line,
    shown,
)

_MAX_TRIGGERS = 16
_ERROR_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_PHASES = 32
_MAX_PROVIDER_NAME = 64
# As many as an attestation may hold fingerprints (proof._MAX_FINGERPRINTS).
_MAX_NOT_ROTATED = 512
_MAX_VCPUS = 4096
_MAX_IRQS = 256
# The deepest reply the protocol defines: response > result > interrupts > channel > per_cpu list.
MAX_RESPONSE_DEPTH = 6


def make_result(request_id: str, result: dict[str, t.Any]) -> dict[str, t.Any]:
    """A success reply."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def make_error(request_id: str | None, code: str, message: str) -> dict[str, t.Any]:
    """An error reply; ``request_id`` is None when the request's id could not be read.

    Any message fits: lone surrogates are escaped before it is cut to the length the other end accepts.
    """
    if not isinstance(code, str) or not _ERROR_CODE_PATTERN.fullmatch(code):
        code = "internal"
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": _SURROGATE.sub(_escape, str(message))[:_MAX_ERROR_MESSAGE]},
    }


def _check_int_or_null(value: t.Any, what: str) -> None:
    if value is not None:
        check_int(value, what)


def _check_int_list(value: t.Any, what: str, max_items: int = _MAX_VCPUS) -> None:
    if not isinstance(value, list) or len(value) > max_items:
        raise ProtocolError("bad_message", f"{what} must be a list of at most {max_items} integers")
    for item in value:
        check_int(item, f"{what} item")


def _check_str_list(value: t.Any, what: str, max_items: int) -> None:
    if not isinstance(value, list) or len(value) > max_items:
        raise ProtocolError("bad_message", f"{what} must be a list of at most {max_items} names")
    for item in value:
        check_str(item, f"{what} item", 512)


def _check_str_dict(value: t.Any, what: str, max_items: int = 512, max_length: int = 1024) -> None:
    if not isinstance(value, dict) or len(value) > max_items:
        raise ProtocolError("bad_message", f"{what} must be an object of at most {max_items} strings")
    for key, item in value.items():
        check_str(key, f"{what} key", 512)
        check_str(item, f"{what}[{key[:64]}]", max_length)


def check_attestation_shape(value: t.Any) -> dict[str, t.Any]:
    """The fields and types of an attestation (the signature is proof.verify_attestation's job)."""
    check_fields(value, "attestation", ("nonce", "uuid", "domain_uuid", "generation", "fingerprints", "public_key", "signature"),
                 ("host_keys",))
    check_hex(value["nonce"], "attestation nonce", NONCE_BYTES)
    check_str(value["uuid"], "attestation uuid", 64)
    check_str(value["domain_uuid"], "attestation domain_uuid", 36, _DOMAIN_UUID_PATTERN)
    check_int(value["generation"], "attestation generation")
    _check_str_dict(value["fingerprints"], "attestation fingerprints")
    if "host_keys" in value:
        _check_str_dict(value["host_keys"], "attestation host_keys", 32, 4096)
    for name in ("public_key", "signature"):
        if value[name] is not None:
            check_str(value[name], f"attestation {name}", 256)
    return value


def _check_interrupt_source(value: t.Any, what: str) -> None:
    check_fields(value, what, ("irq", "per_cpu"), ("irqs", "affinity", "name"))
    _check_int_or_null(value["irq"], f"{what} irq")
    _check_int_list(value["per_cpu"], f"{what} per_cpu")
    if "irqs" in value:
        _check_int_list(value["irqs"], f"{what} irqs", _MAX_IRQS)
    if "affinity" in value:
        _check_int_list(value["affinity"], f"{what} affinity")
    if "name" in value:
        check_str(value["name"], f"{what} name", 256)


def _check_hello_result(result: dict[str, t.Any]) -> None:
    check_fields(
        result,
        "hello result",
        ("agent_version", "protocol", "generation", "uuid", "vcpus", "interrupts", "providers",
         "identity_public_key", "last_trigger"),
        ("registration_error", "triggers", "rotation_due", "uuid_restored", "last_rotation"),
    )
    check_str(result["agent_version"], "agent_version", 64)
    # Whether the guest's RAM was restored since it read its SMBIOS UUID at boot (null: it cannot tell).
    if result.get("uuid_restored") is not None and not isinstance(result["uuid_restored"], bool):
        raise ProtocolError("bad_message", "uuid_restored must be a boolean or null")
    if "triggers" in result:
        triggers = result["triggers"]
        if not isinstance(triggers, dict) or len(triggers) > _MAX_TRIGGERS:
            raise ProtocolError("bad_message", f"triggers must be an object of at most {_MAX_TRIGGERS} entries")
        for name, value in triggers.items():
            check_str(name, "trigger name", 32)
            if value not in TRIGGER_STATES:
                raise ProtocolError("bad_message", f"trigger {name} must be one of {', '.join(TRIGGER_STATES)}")
    if "rotation_due" in result and not isinstance(result["rotation_due"], bool):
        raise ProtocolError("bad_message", "rotation_due must be a boolean")
    if "last_rotation" in result:
        # The providers that failed in the agent's last rotation (its own triggers' included), by generation.
        check_fields(result["last_rotation"], "last_rotation", ("generation", "failed"))
        check_int(result["last_rotation"]["generation"], "last_rotation generation")
        failed = result["last_rotation"]["failed"]
        if not isinstance(failed, list) or len(failed) > 64:
            raise ProtocolError("bad_message", "last_rotation failed must be a list of at most 64 provider names")
        for name in failed:
            check_str(name, "last_rotation provider name", _MAX_PROVIDER_NAME)
    if "registration_error" in result:
        check_str(result["registration_error"], "registration_error", _MAX_ERROR_MESSAGE, free_text=True)
    check_int(result["protocol"], "protocol")
    check_int(result["generation"], "generation")
    check_str(result["uuid"], "uuid", 64)
    check_fields(result["vcpus"], "vcpus", ("online", "registered"))
    _check_int_list(result["vcpus"]["online"], "vcpus online")
    _check_int_list(result["vcpus"]["registered"], "vcpus registered")
    check_fields(result["interrupts"], "interrupts", ("channel", "acpi_sci", "gpe_vmgenid"))
    _check_interrupt_source(result["interrupts"]["channel"], "channel interrupts")
    _check_interrupt_source(result["interrupts"]["acpi_sci"], "acpi_sci interrupts")
    _check_int_or_null(result["interrupts"]["gpe_vmgenid"], "gpe_vmgenid")
    providers = result["providers"]
    if not isinstance(providers, dict) or len(providers) > 64:
        raise ProtocolError("bad_message", "providers must be an object")
    for name, state in providers.items():
        check_str(name, "provider name", _MAX_PROVIDER_NAME)
        check_fields(state, f"provider {name[:64]}", ("enabled", "state"), ("detail",))
        if not isinstance(state["enabled"], bool):
            raise ProtocolError("bad_message", f"provider {name[:64]} enabled must be a boolean")
        check_str(state["state"], f"provider {name[:64]} state", 64)
        if "detail" in state:
            check_str(state["detail"], f"provider {name[:64]} detail", _MAX_ERROR_MESSAGE, free_text=True)
    if result["identity_public_key"] is not None:
        check_str(result["identity_public_key"], "identity_public_key", 256)
    trigger = result["last_trigger"]
    if trigger is not None:
        check_fields(trigger, "last_trigger", ("trigger", "time"),
                     ("generation", "operation", "vmgenid_events", "boot_id", "uuid"))
        if trigger["trigger"] not in TRIGGERS:
            raise ProtocolError("bad_message", f"last_trigger must be one of {', '.join(TRIGGERS)}")
        check_str(trigger["time"], "last_trigger time", 64)
        if "generation" in trigger:
            _check_int_or_null(trigger["generation"], "last_trigger generation")
        if "vmgenid_events" in trigger:
            _check_int_or_null(trigger["vmgenid_events"], "last_trigger vmgenid_events")
        for name in ("boot_id", "uuid"):
            if name in trigger:
                check_str(trigger[name], f"last_trigger {name}", 64)
        if trigger.get("operation") is not None and trigger["operation"] not in ROTATE_OPERATIONS:
            raise ProtocolError("bad_message", f"last_trigger operation must be one of {', '.join(ROTATE_OPERATIONS)}")


def _check_phases(phases: t.Any) -> None:
    """Where the agent spent a rotation's time: phase name -> milliseconds (diagnostics only)."""
    if not isinstance(phases, dict) or len(phases) > _MAX_PHASES:
        raise ProtocolError("bad_message", f"rotate result phases_ms must be an object of at most {_MAX_PHASES} entries")
    for name, value in phases.items():
        check_str(name, "phase name", _MAX_PROVIDER_NAME)
        check_int(value, f"phase {name[:64]}")


def _check_rotate_result(result: dict[str, t.Any]) -> None:
    check_fields(
        result,
        "rotate result",
        ("generation", "operation", "entropy_source", "providers", "duration_ms", "vcpu_interrupts", "attestation"),
        ("phases_ms",),
    )
    check_int(result["generation"], "generation")
    if result["operation"] not in ROTATE_OPERATIONS:
        raise ProtocolError("bad_message", "rotate result operation is not an operation")
    if result["entropy_source"] not in ENTROPY_SOURCES:
        raise ProtocolError("bad_message", "rotate result entropy_source is not an entropy source")
    providers = result["providers"]
    if not isinstance(providers, dict) or len(providers) > 64:
        raise ProtocolError("bad_message", "rotate result providers must be an object")
    for name, outcome in providers.items():
        check_str(name, "provider name", _MAX_PROVIDER_NAME)
        check_fields(outcome, f"provider {name[:64]}", ("status", "method"), ("error", "detail", NOT_ROTATED))
        if outcome["status"] not in PROVIDER_STATUSES:
            raise ProtocolError("bad_message", f"provider {name[:64]} status is not one of {', '.join(PROVIDER_STATUSES)}")
        if outcome["method"] is not None and outcome["method"] not in PROVIDER_METHODS:
            raise ProtocolError("bad_message", f"provider {name[:64]} method is not one of {', '.join(PROVIDER_METHODS)}")
        if "error" in outcome:
            check_str(outcome["error"], f"provider {name[:64]} error", _MAX_ERROR_MESSAGE, free_text=True)
        if "detail" in outcome:
            check_str(outcome["detail"], f"provider {name[:64]} detail", _MAX_ERROR_MESSAGE, free_text=True)
        if NOT_ROTATED in outcome:
            _check_str_list(outcome[NOT_ROTATED], f"provider {name[:64]} {NOT_ROTATED}", _MAX_NOT_ROTATED)
    check_int(result["duration_ms"], "duration_ms")
    if "phases_ms" in result:
        _check_phases(result["phases_ms"])
    _check_int_list(result["vcpu_interrupts"], "vcpu_interrupts")
    check_attestation_shape(result["attestation"])


_RESULT_CHECKS: dict[str, t.Callable[[dict[str, t.Any]], None]] = {
    "hello": _check_hello_result,
    "rotate": _check_rotate_result,
    "attest": check_attestation_shape,
}


def _check_tree(message: dict[str, t.Any]) -> None:
    """No reply nests deeper than the protocol does, and no string in it (keys too) holds a lone surrogate.

    Checked before anything looks inside, without recursion: a hostile depth cannot exhaust the stack
    of whoever walks the reply later, and every string can be encoded as UTF-8.
    """
    stack: list[tuple[t.Any, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items: t.Iterable[t.Any] = value.values()
            for key in value:
                if _SURROGATE.search(key):
                    raise ProtocolError("bad_message", "response holds a name that is not valid Unicode (a lone surrogate)")
        elif isinstance(value, list):
            items = value
        else:
            if isinstance(value, str) and _SURROGATE.search(value):
                raise ProtocolError("bad_message", "response holds a string that is not valid Unicode (a lone surrogate)")
            continue
        if depth > MAX_RESPONSE_DEPTH:
            raise ProtocolError("bad_message", f"response nests deeper than {MAX_RESPONSE_DEPTH} levels")
        stack.extend((item, depth + 1) for item in items)


def parse_response(line: bytes | OversizedLine, expected_id: str, op: str | None = None) -> dict[str, t.Any]:
    """Decode and validate one reply line (host side).

    Returns the whole reply (``ok`` tells success from an error reply); a reply to another
    request, a malformed reply or, when ``op`` is given, a result of the wrong shape raises
    ProtocolError. An error reply may carry ``id: null`` (the agent could not read the id).
    Every string of a returned reply is valid Unicode, and every field of a checked result has
    its type, size and depth checked; names and fingerprints are printable.
    """
    message = decode_line(line)
    _check_tree(message)
    ok = message.get("ok")
    if ok is True:
        check_fields(message, "response", ("v", "id", "ok", "result"))
    elif ok is False:
        check_fields(message, "response", ("v", "id", "ok", "error"))
    else:
        raise ProtocolError("bad_message", "response field ok must be true or false")
    if not check_version(message["v"]):
        raise ProtocolError("bad_version", f"response protocol version {shown(message['v'], 16)} is not {PROTOCOL_VERSION}")
    if message["id"] != expected_id and not (ok is False and message["id"] is None):
        raise ProtocolError("wrong_id", f"response is for request '{shown(message['id'])}', expected {expected_id!r}")
    if ok:
        if not isinstance(message["result"], dict):
            raise ProtocolError("bad_message", "response result must be an object")
        if op is not None:
            if op not in _RESULT_CHECKS:
                raise ProtocolError("unknown_op", f"no result schema for operation {op!r}")
            _RESULT_CHECKS[op](message["result"])
    else:
        check_fields(message["error"], "response error", ("code", "message"))
        check_str(message["error"]["code"], "error code", 64, _ERROR_CODE_PATTERN)
        check_str(message["error"]["message"], "error message", _MAX_ERROR_MESSAGE, free_text=True)
    return message
