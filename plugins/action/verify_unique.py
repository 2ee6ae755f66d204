# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""verify_unique runs on the controller: it judges the multicast results of every host at once."""

from __future__ import annotations

import os
import tempfile
import typing as t

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.action import ActionBase

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.known_hosts import host_key_alias, known_hosts_lines
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

ARGUMENT_SPEC = {
    "results": {"type": "raw"},
    "hosts": {"type": "list", "elements": "str"},
    "result_variable": {"type": "str", "default": "clonesafe_multicast"},
    "run_secret": {"type": "str", "required": True, "no_log": True},
    "golden_fingerprints": {"type": "dict", "default": {}},
    "allow_missing_golden": {"type": "bool", "default": False},
    "fail_on_duplicate": {"type": "bool", "default": True},
    "known_hosts": {"type": "path"},
}


def write_known_hosts(path: str, lines: list[str], check_mode: bool = False) -> bool:
    """Replace ``path`` with ``lines`` (atomically, mode 0644; not in check mode); whether its content changes."""
    content = "".join(f"{line}\n" for line in lines)
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == content:
                return False
    except FileNotFoundError:
        pass
    except OSError as error:
        raise AnsibleActionFail(f"verify_unique: cannot read {path}: {error.strerror}") from error
    if check_mode:
        return True
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        handle_fd, temporary = tempfile.mkstemp(prefix=".known_hosts.", dir=directory)
        with os.fdopen(handle_fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        raise AnsibleActionFail(f"verify_unique: cannot write the known_hosts file {path}: {error.strerror}") from error
    return True


def results_by_host(results: t.Any) -> dict[str, t.Mapping[str, t.Any]]:
    """Accept ``{host: multicast result}`` or a list of multicast results that name their hypervisor."""
    if isinstance(results, t.Mapping):
        return {str(host): value for host, value in results.items()}
    if isinstance(results, list):
        by_host: dict[str, t.Mapping[str, t.Any]] = {}
        for index, value in enumerate(results):
            if not isinstance(value, t.Mapping) or not value.get("hypervisor"):
                raise AnsibleActionFail(
                    f"results[{index}] is not a clonesafe.fleet.secret_multicast result naming its hypervisor; "
                    "pass a dict {host: result} instead"
                )
            host = str(value["hypervisor"])
            if host in by_host:
                # Two hosts answering to one name (hypervisors cloned from one image): one's clones would go unjudged.
                raise AnsibleActionFail(
                    f"results name hypervisor {host!r} twice: give each host's result under its own name (a dict {{host: result}})"
                )
            by_host[host] = value
        return by_host
    raise AnsibleActionFail(f"results must be a dict of host -> secret_multicast result or a list of results, got {type(results).__name__}")


def results_of_hosts(hostvars: t.Any, hosts: list[str], variable: str) -> dict[str, t.Any]:
    """``{host: its variable}`` for every host in ``hosts``: None for a host that never set it (its run failed before).

    A host the inventory does not know is refused: a misspelt name must not shrink the fleet being judged.
    """
    found: dict[str, t.Any] = {}
    for host in hosts:
        if host not in hostvars:
            raise AnsibleActionFail(f"verify_unique: hosts names {host!r}, which is not in the inventory")
        host_vars = hostvars[host]
        found[host] = host_vars[variable] if variable in host_vars else None
    return found


class ActionModule(ActionBase):
    """Verify every clone's signed proof and fail, naming them, if any secret is shared."""

    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: t.Any = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        result = super().run(tmp, task_vars)
        validation = ArgumentSpecValidator(ARGUMENT_SPEC).validate(self._task.args)
        if validation.error_messages:
            raise AnsibleActionFail(f"verify_unique: {'; '.join(validation.error_messages)}")
        args = validation.validated_parameters

        if len(args["run_secret"]) < proof.MIN_RUN_SECRET_LENGTH:
            raise AnsibleActionFail(
                f"verify_unique: run_secret must have at least {proof.MIN_RUN_SECRET_LENGTH} characters "
                "(the secret this run's nonces derive from, given to every secret_multicast of the run)"
            )
        golden = args["golden_fingerprints"]
        if not golden and not args["allow_missing_golden"]:
            raise AnsibleActionFail(
                "verify_unique has no golden fingerprints, so a clone that still holds a secret of the golden "
                "could not be told apart: give golden_fingerprints (the template's, as clonesafe.fleet.golden_snapshot "
                "or clonesafe.fleet.secret_multicast return them), or set allow_missing_golden: true to compare "
                "the clones with each other only"
            )

        if (args["results"] is None) == (args["hosts"] is None):
            raise AnsibleActionFail(
                "verify_unique: give either hosts (the hypervisor hosts, whose result_variable holds their multicast "
                "result) or results (a dict {host: result} or a list of results), not both and not neither"
            )
        if args["hosts"] is not None:
            by_host = results_by_host(results_of_hosts((task_vars or {}).get("hostvars", {}), args["hosts"], args["result_variable"]))
        else:
            by_host = results_by_host(args["results"])
        proofs = uniqueness.collect_proofs(by_host)
        verdict = uniqueness.judge(proofs, golden, args["run_secret"])
        verdict.hosts_without_results = uniqueness.hosts_without_results(by_host)
        result.update(
            changed=False,
            unique=verdict.unique,
            clones_checked=verdict.clones_checked,
            table=verdict.rows,
            report=uniqueness.format_table(verdict.rows) + verdict.notes,
            notes=verdict.notes,
            duplicates=[dict(d, clones=[{"host": h, "clone": c} for h, c in d["clones"]]) for d in verdict.duplicates],
            same_as_golden=verdict.same_as_golden,
            bad_proofs=verdict.bad_proofs,
            incomplete=verdict.incomplete,
            hosts_without_results=verdict.hosts_without_results,
            golden_compared=bool(golden),
            verified=verdict.verified,
        )
        if args["known_hosts"]:
            entries = verdict.verified_host_keys()
            with_keys = {(host, clone) for _uuid, clone, host, _keys in entries}
            without = [f"{clone} on {host}" for host, clones in sorted(verdict.verified.items()) for clone in clones
                       if (host, clone) not in with_keys]
            if without:
                result.setdefault("warnings", []).append(
                    f"verified clone(s) {', '.join(without)} attested no SSH host keys (an agent without host key "
                    f"attestation?): {args['known_hosts']} has no entry for them, so SSH with StrictHostKeyChecking=yes "
                    "refuses them"
                )
            lines = known_hosts_lines(entries)
            result["known_hosts"] = args["known_hosts"]
            result["known_hosts_clones"] = [
                {"host": host, "clone": clone, "alias": host_key_alias(domain_uuid), "keys": sorted(keys)}
                for domain_uuid, clone, host, keys in entries
            ]
            result["changed"] = write_known_hosts(args["known_hosts"], lines, bool(self._play_context.check_mode))
        if not verdict.clones_checked:
            missing = f": {verdict.failure_message()}" if verdict.hosts_without_results else ""
            result.update(failed=True, msg=f"verify_unique found no clone proofs in results: did secret_multicast run and select any clone?{missing}")
        elif not verdict.unique and args["fail_on_duplicate"]:
            result.update(failed=True, msg=f"clones are not proven unique: {verdict.failure_message()}")
        else:
            result["msg"] = (
                f"{verdict.clones_checked} clone(s) proven unique: every signature verified, every secret of the golden "
                "covered, no secret shared" + ("" if golden else " (not compared with the golden: allow_missing_golden)")
                if verdict.unique
                else verdict.failure_message()
            )
        return result
