"""Template distribution with real qcow2 files, a directory source and libvirt's test driver capabilities."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess

import pytest

from clonesafe_testlib import require_module, require_tool

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import distribution
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.memory_compatibility import SavedMachine, memory_problems, version_text
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.template_sources import DirectorySource
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import template

require_tool("qemu-img", "qemu-utils")

QEMU_7_2 = 7002000
GOLDEN_XML = (
    "<domain type='qemu'><name>golden</name><uuid>11111111-2222-3333-4444-555555555555</uuid>"
    "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os></domain>"
)


def caps(machines=("pc-i440fx-7.2",), domain_type="qemu", arch="x86_64"):
    machine_xml = "".join(f"<machine maxCpus='255'>{machine}</machine>" for machine in machines)
    return (
        f"<capabilities><host/><guest><os_type>hvm</os_type><arch name='{arch}'><wordsize>64</wordsize>"
        f"{machine_xml}<machine canonical='{machines[0]}'>pc</machine><domain type='{domain_type}'/></arch></guest>"
        "</capabilities>"
    )


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def make_template(templates: pathlib.Path, name: str = "web", memory_bytes: int = 3 * (1 << 20) + 12345,
                  backing: pathlib.Path | None = None, created_at: str = "2025-01-31T12:00:00.000000Z") -> dict:
    directory = templates / name
    directory.mkdir(parents=True)
    base = directory / "base.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", "qcow2", "-b", str(backing)]
    assert runner(argv + [str(base), "64M"])[0] == 0
    memory = directory / "memory.save"
    memory.write_bytes(os.urandom(memory_bytes))
    manifest = {
        "format": 1,
        "name": name,
        "created_at": created_at,
        "source": {"uri": "qemu:///system", "name": "golden", "uuid": "11111111-2222-3333-4444-555555555555",
                   "xml": GOLDEN_XML},
        "base": {"path": str(base), "size": base.stat().st_size, "sha256": sha256(base),
                 "backing": str(backing) if backing else None},
        "memory": {"path": str(memory), "size": memory.stat().st_size, "sha256": sha256(memory)},
        "proof": {"hash_key": "ab" * 32, "golden_fingerprints": {"identity": "ed25519:abc"}, "sealed": False},
    }
    if backing is not None:
        # What golden_snapshot records: the chain linked into the template, each file checksummed.
        manifest["base"]["backing_chain"] = template.link_backing_chain(runner, str(base), str(directory))
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def source_dir(tmp_path):
    templates = tmp_path / "source"
    make_template(templates)
    return templates


@pytest.fixture
def dest_dir(tmp_path):
    path = tmp_path / "dest"
    path.mkdir()
    return path


def sync(source, dest, mode="memory", capabilities=None, check_mode=False, name="web"):
    request = distribution.Request(name=name, templates_dir=str(dest), mode=mode, host="hv2")
    return distribution.sync_template(source, request, runner, capabilities or (lambda: (caps(), QEMU_7_2)), check_mode)


def test_template_arrives_verified_and_a_second_run_changes_nothing(source_dir, dest_dir):
    outcome = sync(DirectorySource(str(source_dir)), dest_dir)
    assert outcome.changed and outcome.status == "transferred"
    for file in ("base.qcow2", "memory.save"):
        assert sha256(dest_dir / "web" / file) == sha256(source_dir / "web" / file)
    manifest = json.loads((dest_dir / "web" / "manifest.json").read_text())
    assert manifest["distribution"]["mode"] == "memory" and manifest["distribution"]["from"] == str(source_dir)
    assert manifest["memory"]["sha256"] == sha256(source_dir / "web" / "memory.save")
    assert not (dest_dir / ".web.incoming").exists()
    result = outcome.as_dict()
    assert result["bytes_transferred"] == sum(f.stat().st_size for f in (source_dir / "web").iterdir() if f.suffix != ".json")
    assert result["template"]["golden_fingerprints"] == {"identity": "ed25519:abc"}
    assert "ab" * 32 not in json.dumps(result), "the comparison key is never returned"
    assert manifest["proof"]["hash_key"] == "ab" * 32, "secret_multicast on this host reads the key from the manifest"

    again = sync(DirectorySource(str(source_dir)), dest_dir)
    assert not again.changed and again.status == "present" and again.as_dict()["bytes_transferred"] == 0


def test_an_interrupted_transfer_resumes_where_it_stopped(source_dir, dest_dir):
    source = DirectorySource(str(source_dir))
    work = dest_dir / ".web.incoming"
    work.mkdir()
    (work / "source-manifest.json").write_bytes((source_dir / "web" / "manifest.json").read_bytes())
    (work / "base.qcow2").write_bytes((source_dir / "web" / "base.qcow2").read_bytes())  # verified earlier
    memory = (source_dir / "web" / "memory.save").read_bytes()
    # 2.5 MiB arrived, the last half MiB of it torn: resume from the last whole MiB.
    torn = bytearray(memory[: (5 << 20) // 2])
    torn[-100:] = b"\0" * 100
    (work / "memory.save.part").write_bytes(torn)

    outcome = sync(source, dest_dir)
    files = {transfer.file: transfer for transfer in outcome.transfers}
    assert files["base.qcow2"].status == "already verified" and files["base.qcow2"].transferred == 0
    assert files["memory.save"].status == "resumed"
    assert files["memory.save"].resumed_from == 2 << 20
    assert files["memory.save"].transferred == len(memory) - (2 << 20)
    assert (dest_dir / "web" / "memory.save").read_bytes() == memory


def test_a_changed_source_template_restarts_the_incoming_directory(source_dir, dest_dir):
    work = dest_dir / ".web.incoming"
    work.mkdir()
    (work / "source-manifest.json").write_text('{"format": 1, "name": "web", "created_at": "older"}')
    (work / "memory.save.part").write_bytes(b"x" * (3 << 20))
    outcome = sync(DirectorySource(str(source_dir)), dest_dir)
    assert all(transfer.resumed_from == 0 for transfer in outcome.transfers)
    assert sha256(dest_dir / "web" / "memory.save") == sha256(source_dir / "web" / "memory.save")


class CorruptingSource(DirectorySource):
    """Flips one byte of memory.save on the way."""

    def read(self, path, offset):
        for index, block in enumerate(super().read(path, offset)):
            if path.endswith("memory.save") and index == 1:
                block = bytes([block[0] ^ 0xFF]) + block[1:]
            yield block


def test_a_file_damaged_on_the_way_is_deleted_and_named(source_dir, dest_dir):
    with pytest.raises(ClonesafeError, match=r"memory.save from .* arrived damaged .* run again"):
        sync(CorruptingSource(str(source_dir)), dest_dir)
    work = dest_dir / ".web.incoming"
    assert not (work / "memory.save.part").exists() and not (work / "memory.save").exists()
    assert (work / "base.qcow2").exists(), "files verified before the damage are kept"
    assert not (dest_dir / "web").exists()
    outcome = sync(DirectorySource(str(source_dir)), dest_dir)
    assert outcome.changed and sha256(dest_dir / "web" / "memory.save") == sha256(source_dir / "web" / "memory.save")


@pytest.mark.parametrize(
    ("capabilities", "reason"),
    [
        (lambda: (caps(machines=("pc-i440fx-8.2",)), 8002000), "no machine type 'pc-i440fx-7.2'"),
        (lambda: (caps(domain_type="kvm"), QEMU_7_2), "no x86_64 guests with domain type 'qemu'"),
        (lambda: (caps(machines=("pc-i440fx-7.2",)), 7001000), "QEMU 7.1.0 is older than the QEMU 7.2.0"),
    ],
)
def test_a_memory_state_this_host_cannot_load_is_refused_before_copying(source_dir, dest_dir, capabilities, reason):
    class Source72(DirectorySource):
        def qemu_version(self):
            return QEMU_7_2

    with pytest.raises(ClonesafeError, match=reason) as caught:
        sync(Source72(str(source_dir)), dest_dir, capabilities=capabilities)
    assert "mode: disk" in caught.value.msg and "start: boot" in caught.value.msg
    assert list(dest_dir.iterdir()) == []


def test_the_test_driver_cannot_load_a_qemu_memory_state(source_dir, dest_dir):
    libvirt = require_module("libvirt", "libvirt-python")
    conn = libvirt.open("test:///default")
    try:
        capabilities = (conn.getCapabilities(), conn.getVersion())
    finally:
        conn.close()
    with pytest.raises(ClonesafeError, match="cannot load: it offers no x86_64 guests with domain type .qemu."):
        sync(DirectorySource(str(source_dir)), dest_dir, capabilities=lambda: capabilities)


def test_disk_mode_copies_the_base_only_and_memory_mode_later_says_what_to_do(source_dir, dest_dir):
    outcome = sync(DirectorySource(str(source_dir)), dest_dir, mode="disk",
                   capabilities=lambda: pytest.fail("disk mode must not need the host's capabilities"))
    assert [transfer.file for transfer in outcome.transfers] == ["base.qcow2"]
    manifest = json.loads((dest_dir / "web" / "manifest.json").read_text())
    assert manifest["memory"] is None and manifest["distribution"]["mode"] == "disk"
    assert not (dest_dir / "web" / "memory.save").exists()
    assert not sync(DirectorySource(str(source_dir)), dest_dir, mode="disk").changed
    with pytest.raises(ClonesafeError, match="without its memory state .* state=absent"):
        sync(DirectorySource(str(source_dir)), dest_dir, mode="memory")


def test_a_different_template_of_the_same_name_is_never_overwritten(source_dir, dest_dir, tmp_path):
    make_template(dest_dir, created_at="2024-12-24T00:00:00.000000Z")
    before = sha256(dest_dir / "web" / "memory.save")
    with pytest.raises(ClonesafeError, match="already has a different template 'web'"):
        sync(DirectorySource(str(source_dir)), dest_dir)
    assert sha256(dest_dir / "web" / "memory.save") == before


def test_check_mode_transfers_nothing(source_dir, dest_dir):
    outcome = sync(DirectorySource(str(source_dir)), dest_dir, check_mode=True)
    assert outcome.changed and outcome.status == "would transfer"
    assert list(dest_dir.iterdir()) == []


def test_a_missing_template_names_the_source(dest_dir, tmp_path):
    with pytest.raises(ClonesafeError, match="template 'nope' not found on .*golden_snapshot"):
        sync(DirectorySource(str(tmp_path)), dest_dir, name="nope")


def qcow2(path: pathlib.Path, backing: pathlib.Path | None = None, backing_format: str = "qcow2") -> pathlib.Path:
    """A qcow2 image; with a backing file (that need not exist: the header only names it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", backing_format, "-b", str(backing)] + ([] if backing.exists() else ["-u"])
    completed = runner(argv + [str(path), "64M"])
    assert completed[0] == 0, completed
    return path


def write_manifest(directory: pathlib.Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def chain_of(image: pathlib.Path) -> list[str]:
    info = json.loads(runner(["qemu-img", "info", "-f", "qcow2", "--output", "json", "--backing-chain", str(image)])[1])
    return [entry["filename"] for entry in info]


def test_the_backing_chain_arrives_inside_the_templates_directory(tmp_path, dest_dir):
    """golden image <- golden disk <- template base: the chain comes along, checksummed, and resolves here."""
    image = qcow2(tmp_path / "images" / "debian.qcow2")
    golden = qcow2(tmp_path / "golden" / "golden.qcow2", backing=image)
    manifest = make_template(tmp_path / "source", backing=golden)
    assert [entry["file"] for entry in manifest["base"]["backing_chain"]] == ["1-golden.qcow2", "2-debian.qcow2"]
    # The source host's own paths do not exist on this host.
    (tmp_path / "images").rename(tmp_path / "images-moved")
    (tmp_path / "golden").rename(tmp_path / "golden-moved")

    outcome = sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    files = {transfer.file: transfer for transfer in outcome.transfers}
    assert set(files) == {"base.qcow2", "memory.save", "backing/1-golden.qcow2", "backing/2-debian.qcow2"}
    web = dest_dir / "web"
    assert chain_of(web / "base.qcow2") == [str(web / "base.qcow2"), str(web / "backing" / "1-golden.qcow2"),
                                            str(web / "backing" / "2-debian.qcow2")]
    for entry in manifest["base"]["backing_chain"]:
        assert files[f"backing/{entry['file']}"].sha256 == entry["sha256"]
    assert not (tmp_path / "images").exists() and not (tmp_path / "golden").exists(), "nothing written outside"
    # A clone's overlay on this host's base resolves its whole chain.
    overlay = qcow2(tmp_path / "clone" / "disk.qcow2", backing=web / "base.qcow2")
    assert len(chain_of(overlay)) == 4
    assert not sync(DirectorySource(str(tmp_path / "source")), dest_dir).changed
    removed = template.remove_template(template.require_template(str(dest_dir), "web"))
    assert len(removed) == 5 and not web.exists()


def test_a_chain_this_host_already_has_byte_for_byte_is_used_where_it_is(tmp_path, dest_dir):
    """Hosts sharing the golden image's storage: nothing fetched for the chain, the base's header untouched."""
    image = qcow2(tmp_path / "images" / "debian.qcow2")
    golden = qcow2(tmp_path / "golden" / "golden.qcow2", backing=image)
    manifest = make_template(tmp_path / "source", backing=golden)
    outcome = sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    assert [transfer.file for transfer in outcome.transfers] == ["base.qcow2", "memory.save"]
    web = dest_dir / "web"
    assert sha256(web / "base.qcow2") == manifest["base"]["sha256"] and not (web / "backing").exists()
    assert chain_of(web / "base.qcow2") == [str(web / "base.qcow2"), str(golden), str(image)]
    assert json.loads((web / "manifest.json").read_text())["distribution"]["backing_chain"] == "already on this host"


def test_a_local_file_that_differs_from_the_manifest_is_left_alone_and_the_chain_fetched(tmp_path, dest_dir):
    image = qcow2(tmp_path / "images" / "debian.qcow2")
    golden = qcow2(tmp_path / "golden" / "golden.qcow2", backing=image)
    make_template(tmp_path / "source", backing=golden)
    # The golden's disk on this host is not the source's (another golden with the same path).
    golden.unlink()
    qcow2(golden, backing=image)
    with golden.open("r+b") as handle:
        handle.seek(0, 2)
        handle.write(b"this host's own data")
    before = sha256(golden)
    outcome = sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    assert {"backing/1-golden.qcow2", "backing/2-debian.qcow2"} <= {transfer.file for transfer in outcome.transfers}
    web = dest_dir / "web"
    assert chain_of(web / "base.qcow2")[1:] == [str(web / "backing" / "1-golden.qcow2"), str(web / "backing" / "2-debian.qcow2")]
    assert sha256(golden) == before, "a file outside the templates directory is never written"


class MovedBackingSource(DirectorySource):
    """A source that serves any path it is asked for (a compromised host answers what it likes)."""

    def __init__(self, templates_dir, backing_path, real_path):
        super().__init__(templates_dir)
        self.moved = {backing_path: real_path}

    def read(self, path, offset):
        return super().read(self.moved.get(path, path), offset)

    def file_size(self, path):
        """Asked by the versions that fetched a backing file to the path the base's header names."""
        return os.path.getsize(self.moved.get(path, path))


def test_a_compromised_source_cannot_make_this_host_write_outside_its_templates_directory(tmp_path, dest_dir):
    """The base's header names a file outside: it used to be fetched to that very path, as root, unchecked."""
    target = tmp_path / "outside" / "authorized_keys"
    payload = qcow2(tmp_path / "payload.qcow2")
    manifest = make_template(tmp_path / "source")
    base = tmp_path / "source" / "web" / "base.qcow2"
    qcow2(base, backing=target)  # the header names the target; the manifest says nothing of it
    manifest["base"] |= {"backing": str(target), "size": base.stat().st_size, "sha256": sha256(base)}
    write_manifest(tmp_path / "source" / "web", manifest)

    with pytest.raises(ClonesafeError, match="names no checksummed backing files .* re-create the template"):
        sync(MovedBackingSource(str(tmp_path / "source"), str(target), str(payload)), dest_dir)
    assert not target.exists() and not target.parent.exists()


@pytest.mark.parametrize("file", ["../../outside.qcow2", "/etc/cron.d/x", ".hidden", "a/b", ""])
def test_a_backing_file_name_must_stay_inside_the_template(tmp_path, dest_dir, file):
    golden = qcow2(tmp_path / "golden" / "golden.qcow2")
    manifest = make_template(tmp_path / "source", backing=golden)
    manifest["base"]["backing_chain"][0]["file"] = file
    write_manifest(tmp_path / "source" / "web", manifest)
    with pytest.raises(ClonesafeError, match="must be a distinct plain file name"):
        sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    assert list(dest_dir.iterdir()) == []


def test_a_header_naming_another_backing_file_than_the_manifest_is_refused(tmp_path, dest_dir):
    golden = qcow2(tmp_path / "golden" / "golden.qcow2")
    manifest = make_template(tmp_path / "source", backing=golden)
    base = tmp_path / "source" / "web" / "base.qcow2"
    # The source rewrites the header to read a file of this host, as raw, and fixes the base's checksum.
    assert runner(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(base)])[0] == 0
    manifest["base"] |= {"size": base.stat().st_size, "sha256": sha256(base)}
    write_manifest(tmp_path / "source" / "web", manifest)
    with pytest.raises(ClonesafeError, match="names the backing file '/etc/passwd', but the manifest says"):
        sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    assert not (dest_dir / "web").exists()


def test_a_backing_file_that_names_a_further_file_the_manifest_does_not_is_refused(tmp_path, dest_dir):
    golden = qcow2(tmp_path / "golden" / "golden.qcow2")
    manifest = make_template(tmp_path / "source", backing=golden)
    linked = tmp_path / "source" / "web" / "backing" / "1-golden.qcow2"
    assert runner(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "/var/lib/x.qcow2", str(linked)])[0] == 0
    manifest["base"]["backing_chain"][0] |= {"size": linked.stat().st_size, "sha256": sha256(linked)}
    write_manifest(tmp_path / "source" / "web", manifest)
    with pytest.raises(ClonesafeError, match="names a backing file .*/var/lib/x.qcow2.* that the manifest does not"):
        sync(DirectorySource(str(tmp_path / "source")), dest_dir)


def test_a_backing_file_that_does_not_match_its_checksum_is_deleted(tmp_path, dest_dir):
    golden = qcow2(tmp_path / "golden" / "golden.qcow2")
    manifest = make_template(tmp_path / "source", backing=golden)
    manifest["base"]["backing_chain"][0]["sha256"] = "0" * 64
    write_manifest(tmp_path / "source" / "web", manifest)
    with pytest.raises(ClonesafeError, match="1-golden.qcow2 from .* arrived damaged"):
        sync(DirectorySource(str(tmp_path / "source")), dest_dir)
    assert not (dest_dir / ".web.incoming" / "backing" / "1-golden.qcow2").exists()


def test_a_qcow2_keeping_its_data_in_another_file_is_refused(tmp_path, dest_dir):
    manifest = make_template(tmp_path / "source")
    base = tmp_path / "source" / "web" / "base.qcow2"
    base.unlink()
    assert runner(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(base), "1M"])[0] == 0
    manifest["base"] |= {"size": base.stat().st_size, "sha256": sha256(base)}
    write_manifest(tmp_path / "source" / "web", manifest)
    with pytest.raises(ClonesafeError, match="keeps its data in an external file"):
        sync(DirectorySource(str(tmp_path / "source")), dest_dir)


def test_every_image_is_opened_as_qcow2_never_probed(tmp_path, dest_dir):
    golden = qcow2(tmp_path / "golden" / "golden.qcow2")
    make_template(tmp_path / "source", backing=golden)
    calls = []

    def recording(argv):
        calls.append(argv)
        return runner(argv)

    request = distribution.Request(name="web", templates_dir=str(dest_dir), mode="disk", host="hv2")
    distribution.sync_template(DirectorySource(str(tmp_path / "source")), request, recording, lambda: None)
    assert calls, "the chain is checked with qemu-img"
    for argv in calls:
        assert argv[0] == "qemu-img" and argv[argv.index("-f") + 1] == "qcow2", argv
        if "-b" in argv:
            assert argv[argv.index("-F") + 1] == "qcow2", argv


def test_the_distributed_manifest_is_readable_by_root_only(source_dir, dest_dir):
    """It holds the fleet's comparison key, like the manifest golden_snapshot writes (0600)."""
    with pytest.raises(ClonesafeError):
        sync(CorruptingSource(str(source_dir)), dest_dir)
    assert (dest_dir / ".web.incoming" / "source-manifest.json").stat().st_mode & 0o777 == 0o600
    sync(DirectorySource(str(source_dir)), dest_dir)
    assert (dest_dir / "web" / "manifest.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("version", [1.0, True, "1", None, 2])
def test_the_manifest_format_is_the_integer_itself(source_dir, dest_dir, version):
    """1.0 == 1 and True == 1 in Python: neither may pass as manifest format 1."""
    path = source_dir / "web" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format": version}))
    with pytest.raises(ClonesafeError, match="this collection reads format 1"):
        sync(DirectorySource(str(source_dir)), dest_dir)
    with pytest.raises(ClonesafeError, match="this collection reads format 1"):
        template.load_template(str(source_dir), "web")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["base"].update(size="64M"), "gives the base disk no size"),
        (lambda m: m["base"].update(size=1.5), "gives the base disk no size"),
        (lambda m: m["base"].pop("sha256"), "gives the base disk no sha256"),
        (lambda m: m["memory"].update(sha256="ab"), "gives the memory state no sha256"),
        (lambda m: m.update(base=["x"]), "describes the base disk with a list"),
        (lambda m: m.update(name="other"), "is for template 'other', not 'web'"),
    ],
)
def test_every_file_a_manifest_names_has_a_size_and_a_checksum(source_dir, dest_dir, change, message):
    path = source_dir / "web" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ClonesafeError, match=message):
        sync(DirectorySource(str(source_dir)), dest_dir)
    assert list(dest_dir.iterdir()) == []


def test_a_deeply_nested_or_huge_manifest_is_an_error_not_a_crash(source_dir, dest_dir):
    path = source_dir / "web" / "manifest.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ClonesafeError, match="is not JSON"):
        sync(DirectorySource(str(source_dir)), dest_dir)
    path.write_bytes(b" " * (template.MAX_MANIFEST_BYTES + 10))
    with pytest.raises(ClonesafeError, match="is not a template manifest"):
        sync(DirectorySource(str(source_dir)), dest_dir)


def test_memory_problems_accept_the_canonical_machine_name():
    saved = SavedMachine("qemu", "x86_64", "pc-i440fx-7.2", QEMU_7_2)
    assert memory_problems(saved, caps(), QEMU_7_2) == []
    assert memory_problems(saved, caps(), 8000000) == []
    assert version_text(7002022) == "7.2.22"
    # The saved machine named only as the canonical name of an alias ("pc"), not listed on its own.
    alias_only = ("<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>"
                  "<machine canonical='pc-i440fx-7.2'>pc</machine><domain type='qemu'/></arch></guest></capabilities>")
    assert memory_problems(saved, alias_only, QEMU_7_2) == []
    elsewhere = SavedMachine("qemu", "x86_64", "pc-i440fx-6.2", QEMU_7_2)
    assert memory_problems(elsewhere, alias_only, QEMU_7_2) != []
