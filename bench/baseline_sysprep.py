# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The usual way to a unique running clone, timed: virt-clone (full copy), virt-sysprep, cold boot.

The baseline half of issue 5's benchmark. On the lab image, for N clones one after another:

    copy     virt-clone --original-xml GOLDEN.xml --name NAME --file NAME.qcow2 (a full copy)
    sysprep  virt-sysprep -a NAME.qcow2 --operations ssh-hostkeys,machine-id
    boot     start the clone cold and wait until its agent answers `hello` on the clone's channel
             (the agent starts after its boot check, which regenerates the clone's secrets because
             the SMBIOS UUID is new, and before sshd)
    attest   one signed attestation per clone; at the end every proof is verified and compared
             across clones and with the golden (the collection's own uniqueness judge)

Run from the repository root, as root, with the lab up (`make lab`):

    make collection && .venv/bin/python bench/baseline_sysprep.py [--clones 4] [--parallel] [--json FILE]

`--parallel` runs the clones' pipelines at the same time (the copies one at a time, as virt-clone
defines one storage pool for the work directory; sysprep, boot and attest concurrently) and reports
the wall-clock time to the last proven-unique clone: the usual path at its best on this machine.

"The golden" is a throwaway: a fresh thin overlay of the lab image booted once (so its agent has
recorded its own identity and SMBIOS UUID, like the lab golden) and shut down; the lab's own golden
VM is never touched. Installs virtinst and libguestfs-tools with apt-get when virt-clone or
virt-sysprep is missing. libguestfs runs with the direct backend under TCG (no KVM here) and, when
/boot has no kernel, boots its appliance with the lab image's kernel and modules. At most one VM of
its own runs at a time without `--parallel` (a clone is destroyed once measured). Everything it creates (domains, disks,
the storage pool virt-clone defines for the work directory) is removed at the end, also on failure.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "build" / "collections"), str(REPO / "tests")]

import libvirt  # noqa: E402  pylint: disable=wrong-import-position

from helpers.agent_channel import AgentChannel, AgentError, fresh_hex  # noqa: E402  pylint: disable=wrong-import-position

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import (  # noqa: E402  pylint: disable=wrong-import-position
    DomainSpec,
    build_domain_xml,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire  # noqa: E402  pylint: disable=wrong-import-position

LAB_FILE = pathlib.Path("/var/lib/clonesafe/lab.json")
TOOLS = {"virt-clone": "virtinst", "virt-sysprep": "libguestfs-tools"}
SYSPREP_OPERATIONS = "ssh-hostkeys,machine-id"
READY_MARKER = "clonesafe-lab: userspace reached"


def ensure_tools() -> dict[str, str]:
    """virt-clone and virt-sysprep, installed from Debian packages when missing."""
    missing = sorted({package for tool, package in TOOLS.items() if not shutil.which(tool)})
    if missing:
        print(f"installing {' '.join(missing)} with apt-get (--no-install-recommends) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    paths = {tool: shutil.which(tool) for tool in TOOLS}
    absent = [tool for tool, path in paths.items() if not path]
    if absent:
        raise SystemExit(f"still missing after apt-get: {', '.join(absent)}")
    return {tool: str(path) for tool, path in paths.items()}


def libguestfs_env(lab: dict) -> tuple[dict[str, str], bool]:
    """Environment for virt-sysprep here; also whether /lib/modules had to be created for supermin.

    The direct backend runs QEMU itself (no libvirt domain). TCG unless the lab uses KVM: the
    /dev/kvm of these machines hangs stock kernels. supermin builds its appliance from the host's
    packages plus a kernel; when /boot has none, the lab image's Debian kernel and its modules
    (from the image's rootfs) are used. supermin then still lstat()s the host's /lib/modules,
    which a machine without a kernel package lacks: an empty one is created (and removed later).
    """
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    if lab["domain_type"] != "kvm":
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    created_modules_dir = False
    if "SUPERMIN_KERNEL" not in env and not glob.glob("/boot/vmlinuz-*"):
        modules_root = pathlib.Path(lab["image"]["rootfs"]) / "lib" / "modules"
        versions = sorted(path.name for path in modules_root.iterdir() if path.is_dir())
        if len(versions) != 1:
            raise SystemExit(f"expected one kernel version under {modules_root}, found {versions}: set SUPERMIN_KERNEL* yourself")
        env["SUPERMIN_KERNEL"] = lab["image"]["kernel"]
        env["SUPERMIN_KERNEL_VERSION"] = versions[0]
        env["SUPERMIN_MODULES"] = str(modules_root / versions[0])
        if not os.path.lexists("/lib/modules"):
            os.makedirs("/lib/modules")
            created_modules_dir = True
    return env, created_modules_dir


def domain_xml(lab: dict, name: str, disk: str, work: pathlib.Path, mac: str, files: str | None = None) -> str:
    """Our own domain XML (the lab golden's shape) without clonesafe's marker: a foreign domain to the modules.

    Console log and channel socket are WORK/FILES.log and WORK/FILES.sock (FILES defaults to the name).
    """
    image = lab["image"]
    files = files or name
    spec = DomainSpec(name=name, disk=disk, kernel=image["kernel"], initrd=image["initrd"], cmdline=image["cmdline"],
                      console_log=str(work / f"{files}.log"), channel_socket=str(work / f"{files}.sock"),
                      domain_type=lab["domain_type"], memory_mib=512, vcpus=2, nic="user", mac=mac)
    root = ET.fromstring(build_domain_xml(spec))
    root.remove(root.find("metadata"))
    return ET.tostring(root, encoding="unicode")


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in os.urandom(3))


class ConsoleWatch:
    """Time (from `started`) when lines first appear in a console log, polled in a thread."""

    def __init__(self, path: str, patterns: list[str], started: float) -> None:
        self.path, self.patterns, self.started = path, patterns, started
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.seen) < len(self.patterns):
            try:
                text = pathlib.Path(self.path).read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            for pattern in self.patterns:
                if pattern not in self.seen and pattern in text:
                    self.seen[pattern] = time.monotonic() - self.started
            self.stop.wait(0.1)

    def finish(self, grace: float = 0.0) -> dict[str, float]:
        deadline = time.monotonic() + grace
        while len(self.seen) < len(self.patterns) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop.set()
        self.thread.join()
        return dict(self.seen)


def _reply_to(line, sent: set[str], op: str) -> dict | None:
    """The result of a reply to one of ``sent``; None for a reply to anything else (skipped)."""
    try:
        message_id = wire.decode_line(line).get("id")
    except wire.ProtocolError:
        return None
    if message_id not in sent:
        return None
    reply = wire.parse_response(line, message_id, op)
    if not reply["ok"]:
        raise AgentError(reply["error"])
    return reply["result"]


def call(channel: AgentChannel, op: str, args: dict, timeout: float = 60.0) -> dict:
    """One request; replies to other requests (hellos still queued from the wait) are skipped."""
    request_id = fresh_hex(8)
    channel.send_raw(wire.encode_request(op, args, request_id))
    deadline = time.monotonic() + timeout
    while True:
        result = _reply_to(channel.read_line(max(0.01, deadline - time.monotonic())), {request_id}, op)
        if result is not None:
            return result


def wait_for_hello(path: str, timeout: float, interval: float = 2.0) -> tuple[AgentChannel, dict]:
    """The channel and the agent's first `hello` reply, as soon as the booting guest's agent answers.

    A `hello` sent before the agent opened its port is delivered when it does, possibly to a later
    connection: so one connection is kept, a `hello` is sent every ``interval`` s, and the first
    reply to any of them counts (tests/helpers' wait_for_agent reconnects and would fail on the
    earlier reply's id).
    """
    deadline = time.monotonic() + timeout
    sent: set[str] = set()
    channel = None
    while time.monotonic() < deadline:
        if channel is None:
            try:
                channel = AgentChannel(path)
            except OSError:
                time.sleep(0.2)
                continue
        try:
            request_id = fresh_hex(8)
            channel.send_raw(wire.encode_request("hello", {}, request_id))
            sent.add(request_id)
            resend = time.monotonic() + interval
            while time.monotonic() < resend:
                result = _reply_to(channel.read_line(max(0.01, resend - time.monotonic())), sent, "hello")
                if result is not None:
                    return channel, result
        except TimeoutError:
            continue
        except OSError:
            channel.close()
            channel = None
            time.sleep(0.2)
    raise TimeoutError(f"no agent answered hello on {path} within {timeout:g} s")


def attest(channel: AgentChannel, hash_key: str) -> tuple[str, dict]:
    nonce = fresh_hex()
    return nonce, call(channel, "attest", {"nonce": nonce, "hash_key": hash_key})


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Run a command; its wall time, or SystemExit with its stderr's tail."""
    started = time.monotonic()
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{cmd[0]} failed ({completed.returncode}) after {elapsed:.1f} s:\n{tail}")
    return elapsed


class Baseline:
    """One run; remembers everything it made so `cleanup` can remove it whatever happened."""

    def __init__(self, lab: dict, uri: str, tools: dict[str, str], env: dict[str, str], boot_timeout: float) -> None:
        self.lab, self.uri, self.tools, self.env, self.boot_timeout = lab, uri, tools, env, boot_timeout
        self.tag = uuid.uuid4().hex[:4]
        self.copy_lock = threading.Lock()
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="clonesafe-baseline-", dir="/var/tmp"))
        self.conn = LibvirtConnection(uri)
        self.domains: list[str] = []
        self.hash_key = fresh_hex()

    # -- the golden ------------------------------------------------------------------------

    def prepare_golden(self) -> dict:
        """A thin overlay of the lab image, booted once and shut down: the disk virt-clone copies."""
        name = f"bench{self.tag}-baseline-golden"
        disk = self.work / "golden.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.lab["image"]["disk"], str(disk)])
        xml = domain_xml(self.lab, name, str(disk), self.work, random_mac())
        (self.work / "golden.xml").write_text(xml)
        self.domains.append(name)
        domain = self.conn.define_domain(xml, name)
        started = time.monotonic()
        self.conn.start_domain(domain)
        channel, hello = wait_for_hello(str(self.work / f"{name}.sock"), self.boot_timeout)
        booted = time.monotonic() - started
        with channel:
            nonce, attestation = attest(channel, self.hash_key)
        fingerprints = proof.verify_attestation(attestation, nonce)
        # Powered off, not shut down: the image does not act on the ACPI power button (a trial waited
        # 180 s in vain). The agent has fsync'd its state and identity by the time it answers.
        self.conn.destroy_domain(domain)
        self.conn.undefine_domain(domain)
        self.domains.remove(name)
        print(f"golden: {disk} (overlay of {self.lab['image']['disk']}), booted to agent in {booted:.1f} s "
              f"(generation {hello['generation']}), then powered off", flush=True)
        return {"disk": str(disk), "fingerprints": fingerprints, "boot_s": booted}

    def warm_libguestfs(self, disk: str) -> float:
        """Build libguestfs' appliance once (cached in /var/tmp/.guestfs-UID) so no clone pays for it."""
        return run(["guestfish", "--ro", "--format=qcow2", "-a", disk, "run"], env=self.env)

    # -- one clone -------------------------------------------------------------------------

    def clone(self, index: int, golden_disk: str) -> tuple[dict, uniqueness.CloneProof]:
        name = f"bench{self.tag}-baseline-{index:02d}"
        disk = str(self.work / f"{name}.qcow2")
        # The original's host-side paths are the clone's (virt-clone keeps them); virt-clone gives
        # it a new name, UUID (so a new SMBIOS UUID), MAC and a full copy of the golden's disk.
        original = self.work / f"{name}.original.xml"
        original.write_text(domain_xml(self.lab, f"bench{self.tag}-baseline-golden", golden_disk, self.work, random_mac(), files=name))
        self.domains.append(name)
        with self.copy_lock:
            copy_s = run([self.tools["virt-clone"], "--connect", self.uri, "--original-xml", str(original), "--name", name,
                          "--file", disk, "--check", "all=off"])
        sysprep_s = run([self.tools["virt-sysprep"], "--format", "qcow2", "-a", disk, "--operations", SYSPREP_OPERATIONS],
                        env=self.env)
        domain = self.conn.get_domain(name)
        started, wall_started = time.monotonic(), time.time()
        self.conn.start_domain(domain)
        watch = ConsoleWatch(str(self.work / f"{name}.log"), [READY_MARKER], started)
        channel, hello = wait_for_hello(str(self.work / f"{name}.sock"), self.boot_timeout)
        agent_s = time.monotonic() - started
        with channel:
            attest_started = time.monotonic()
            nonce, attestation = attest(channel, self.hash_key)
            attest_s = time.monotonic() - attest_started
        console = watch.finish(grace=5.0)
        last = hello.get("last_trigger") or {}
        # When the agent's boot check finished regenerating, by the guest's clock (UTC from the RTC: +-1 s).
        regenerated_s = None
        if last.get("time"):
            regenerated = datetime.datetime.strptime(last["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
            regenerated_s = regenerated.timestamp() - wall_started
        row = {
            "clone": name, "copy_s": copy_s, "sysprep_s": sysprep_s, "boot_to_agent_s": agent_s, "attest_s": attest_s,
            "total_s": copy_s + sysprep_s + agent_s + attest_s,
            "console_userspace_s": console.get(READY_MARKER), "guest_regenerated_s": regenerated_s,
            "generation": hello["generation"], "last_trigger": last.get("trigger"),
            "disk_bytes": os.stat(disk).st_blocks * 512, "uuid": hello["uuid"],
        }
        self.conn.destroy_domain(domain)
        self.conn.undefine_domain(domain)
        self.domains.remove(name)
        os.unlink(disk)
        return row, uniqueness.CloneProof(host="localhost", name=name, nonce=nonce, attestation=attestation)

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        for name in list(self.domains):
            domain = self.conn.find_domain(name)
            if domain is not None:
                try:
                    if domain.isActive():
                        domain.destroy()
                    domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                except libvirt.libvirtError as error:
                    print(f"cleanup: domain {name}: {error}", file=sys.stderr)
        # virt-clone (virtinst) defines a directory storage pool for a disk's directory: ours only.
        for pool in self.conn.conn.listAllStoragePools(0):
            try:
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if path and os.path.realpath(path) == os.path.realpath(self.work):
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            except libvirt.libvirtError as error:
                print(f"cleanup: storage pool {pool.name()}: {error}", file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)
        self.conn.close()


def print_report(rows: list[dict], verdict: uniqueness.Verdict, golden: dict, warm_s: float, lab: dict,  # pylint: disable=too-many-arguments
                 parallel: bool, wall_s: float) -> dict:
    columns = [("clone", "clone", "{}"), ("copy s", "copy_s", "{:.2f}"), ("sysprep s", "sysprep_s", "{:.2f}"),
               ("boot->agent s", "boot_to_agent_s", "{:.2f}"), ("attest ms", "attest_s", "{:.0f}"),
               ("total s", "total_s", "{:.2f}"), ("userspace s", "console_userspace_s", "{:.1f}"),
               ("regenerated s", "guest_regenerated_s", "{:.1f}"),
               ("trigger", "last_trigger", "{}")]

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        return fmt.format(value * 1000 if key == "attest_s" else value)

    table = [[title for title, _key, _fmt in columns]] + [[cell(row, key, fmt) for _title, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print("\nbaseline: virt-clone (full copy) -> virt-sysprep --operations " + SYSPREP_OPERATIONS + " -> cold boot, "
          + ("the clones at the same time" if parallel else "one clone after another"))
    for line in table:
        print("  " + "  ".join(value.rjust(width) if i else value.ljust(width) for i, (value, width) in enumerate(zip(line, widths))))
    summary = {key: statistics.mean(row[key] for row in rows) for key in ("copy_s", "sysprep_s", "boot_to_agent_s", "attest_s", "total_s")}
    serial_total = sum(row["total_s"] for row in rows)
    print(f"  mean per clone: copy {summary['copy_s']:.2f} s + sysprep {summary['sysprep_s']:.2f} s + boot to agent "
          f"{summary['boot_to_agent_s']:.2f} s + attest {summary['attest_s'] * 1000:.0f} ms = {summary['total_s']:.2f} s")
    # One after another: the sum of the measured pipelines (teardown between clones not counted).
    to_last_s = wall_s if parallel else serial_total
    print(f"  {len(rows)} clones {'at the same time' if parallel else 'one after another'}: {to_last_s:.1f} s "
          "to the last proven-unique running clone")
    print(f"  proof: {verdict.clones_checked} attestations verified; "
          + ("every fingerprint unique and none the golden's" if verdict.unique else "NOT UNIQUE: " + verdict.failure_message()))
    print("  (userspace: the image's 'userspace reached' line on the console; regenerated: the agent's boot check done, guest clock;")
    print(f"   not timed: golden prepared in {golden['boot_s']:.1f} s; "
          f"libguestfs appliance warm-up {warm_s:.1f} s; host load average now {os.getloadavg()[0]:.2f})")
    return {
        "benchmark": "baseline_sysprep", "clones": len(rows), "mode": "parallel" if parallel else "sequential", "wall_s": wall_s,
        "domain_type": lab["domain_type"], "image": lab["image"]["disk"], "image_bytes": lab["image"]["size_bytes"],
        "sysprep_operations": SYSPREP_OPERATIONS, "per_clone": rows, "mean": summary, "sequential_total_s": serial_total,
        "unique": verdict.unique, "problems": verdict.failure_message(), "golden_boot_s": golden["boot_s"],
        "libguestfs_warmup_s": warm_s, "loadavg": os.getloadavg(),
    }


def main() -> None:
    lab = json.loads(LAB_FILE.read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=lab["uri"])
    parser.add_argument("--clones", type=int, default=4)
    parser.add_argument("--boot-timeout", type=float, default=600.0)
    parser.add_argument("--parallel", action="store_true", help="run the clones' pipelines at the same time")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    # A SIGTERM (e.g. a CI timeout) still runs the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tools = ensure_tools()
    env, created_modules_dir = libguestfs_env(lab)
    bench = Baseline(lab, args.uri, tools, env, args.boot_timeout)
    try:
        golden = bench.prepare_golden()
        warm_s = bench.warm_libguestfs(golden["disk"])
        print(f"libguestfs appliance ready ({warm_s:.1f} s, not timed); cloning {args.clones} ...", flush=True)
        rows, proofs = [], []
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.clones if args.parallel else 1) as pool:
            for row, clone_proof in pool.map(lambda index: bench.clone(index, golden["disk"]), range(1, args.clones + 1)):
                rows.append(row)
                proofs.append(clone_proof)
                print(f"  {row['clone']}: copy {row['copy_s']:.2f} s, sysprep {row['sysprep_s']:.2f} s, "
                      f"boot to agent {row['boot_to_agent_s']:.2f} s (trigger {row['last_trigger']})", flush=True)
        wall_s = time.monotonic() - started
        verdict = uniqueness.judge(proofs, golden["fingerprints"], proof.verify_attestation)
        result = print_report(rows, verdict, golden, warm_s, lab, args.parallel, wall_s)
        print(json.dumps(result, indent=2, sort_keys=True))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    finally:
        bench.cleanup()
        if created_modules_dir:
            try:
                os.rmdir("/lib/modules")
            except OSError:
                pass


if __name__ == "__main__":
    main()
