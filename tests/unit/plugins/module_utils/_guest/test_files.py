"""The logic of agent_files on real directories: what it writes, what it leaves alone, what it refuses."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

import pytest

from clonesafe_testlib import missing_prerequisite

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._guest.files import (
    DirectorySpec,
    FileSpec,
    Owner,
    guest_path,
    install,
    logged_arguments,
    parse_directories,
    parse_files,
    parse_mode,
    root_directory,
)

# The tests own their files whoever runs them; the module always passes root (0:0).
ME = Owner(os.getuid(), os.getgid())
LIB = "/usr/lib/example"
DIRECTORIES = [DirectorySpec(LIB, 0o755), DirectorySpec(f"{LIB}/pkg", 0o755), DirectorySpec("/var/lib/example", 0o700)]
CONTENTS = {
    f"{LIB}/pkg/__init__.py": b"",
    f"{LIB}/pkg/main.py": "print('gr\u00fc\u00df dich, \u4e16\u754c')\n\n".encode(),
    f"{LIB}/pkg/crlf.txt": b"one\r\ntwo\r\n   \n",
    f"{LIB}/pkg/template_like.py": b"PATTERN = '[0-9a-f]{%d}' % 32  # {{ not a template }}\n",
}


def files(**changed: bytes) -> list[FileSpec]:
    """The test's files, with the contents named by their file name in ``changed`` replaced."""
    return [FileSpec(path, changed.get(pathlib.PurePath(path).stem, content)) for path, content in CONTENTS.items()]


def run(root: pathlib.Path, file_specs: list[FileSpec] | None = None, check_mode: bool = False,
        directories: list[DirectorySpec] | None = None):
    return install(str(root), DIRECTORIES if directories is None else directories,
                   files() if file_specs is None else file_specs, check_mode, ME)


def snapshot(root: pathlib.Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, mode, inode, mtime and bytes: what a run must leave alone."""
    seen = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        seen[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_ino,
                                             info.st_mtime_ns, data)
    return seen


def test_a_first_run_writes_every_file_byte_for_byte_with_its_mode(tmp_path):
    outcome = run(tmp_path, [FileSpec(path, content, 0o600 if path.endswith("crlf.txt") else 0o644)
                             for path, content in CONTENTS.items()])
    assert outcome.changed
    assert outcome.files == list(CONTENTS)
    assert outcome.directories == ["/usr", "/usr/lib", LIB, f"{LIB}/pkg", "/var", "/var/lib", "/var/lib/example"]
    for path, content in CONTENTS.items():
        written = tmp_path / path.lstrip("/")
        assert written.read_bytes() == content, path
        assert stat.S_IMODE(written.stat().st_mode) == (0o600 if path.endswith("crlf.txt") else 0o644), path
    # Listed directories get their mode whatever the umask; parents nobody listed get 0755.
    assert stat.S_IMODE((tmp_path / "var/lib/example").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var/lib").stat().st_mode) == 0o755
    # No temporary file is left beside the targets.
    assert sorted(p.name for p in (tmp_path / "usr/lib/example/pkg").iterdir()) == sorted(
        pathlib.PurePath(path).name for path in CONTENTS)


def test_a_second_run_changes_nothing_and_touches_nothing(tmp_path):
    run(tmp_path)
    before = snapshot(tmp_path)
    outcome = run(tmp_path)
    assert not outcome.changed and outcome.files == [] and outcome.directories == []
    assert outcome.before == outcome.after == {"directories": {}, "files": {}}
    assert snapshot(tmp_path) == before


def test_check_mode_on_an_empty_root_reports_everything_and_writes_nothing(tmp_path):
    outcome = run(tmp_path, check_mode=True)
    assert outcome.changed and outcome.files == list(CONTENTS)
    assert f"{LIB}/pkg" in outcome.directories
    assert list(tmp_path.iterdir()) == []
    assert outcome.before["files"] == dict.fromkeys(CONTENTS)


def test_check_mode_on_an_installed_tree_reports_only_the_difference_and_writes_nothing(tmp_path):
    run(tmp_path)
    os.chmod(tmp_path / "var/lib/example", 0o755)
    before = snapshot(tmp_path)
    outcome = run(tmp_path, files(main=b"print('new')\n"), check_mode=True)
    assert outcome.files == [f"{LIB}/pkg/main.py"]
    assert outcome.directories == ["/var/lib/example"]
    assert snapshot(tmp_path) == before


def test_a_changed_file_is_replaced_by_a_new_file_and_the_others_are_untouched(tmp_path):
    run(tmp_path)
    main = tmp_path / "usr/lib/example/pkg/main.py"
    old = main.stat()
    # An old mtime: a rewrite within the same second must still be seen by Python's bytecode cache.
    os.utime(main, ns=(old.st_atime_ns, old.st_mtime_ns - 10**10))
    before = snapshot(tmp_path)
    outcome = run(tmp_path, files(main=b"print('new')\n"))
    assert outcome.files == [f"{LIB}/pkg/main.py"] and outcome.directories == []
    after = snapshot(tmp_path)
    key = "usr/lib/example/pkg/main.py"
    assert after[key][4] == b"print('new')\n"
    assert after[key][2] != before[key][2], "a new inode (written beside, renamed over), not rewritten in place"
    assert after[key][3] > before[key][3], "a fresh mtime, so the .pyc of the old source is stale"
    # The directory's mtime moves with the rename; nothing else does.
    assert {name: value[:3] + (value[3] if value[4] is not None else None, value[4])
            for name, value in after.items() if name != key} == {
        name: value[:3] + (value[3] if value[4] is not None else None, value[4])
        for name, value in before.items() if name != key}


def test_a_file_with_the_right_bytes_only_gets_its_mode(tmp_path):
    run(tmp_path)
    target = tmp_path / "usr/lib/example/pkg/main.py"
    os.chmod(target, 0o666)
    inode = target.stat().st_ino
    outcome = run(tmp_path)
    assert outcome.files == [f"{LIB}/pkg/main.py"]
    digest = hashlib.sha256(CONTENTS[f"{LIB}/pkg/main.py"]).hexdigest()
    assert outcome.before["files"][f"{LIB}/pkg/main.py"] == {"sha256": digest, "mode": "0666", "owner": str(ME)}
    assert outcome.after["files"][f"{LIB}/pkg/main.py"] == {"sha256": digest, "mode": "0644", "owner": str(ME)}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.stat().st_ino == inode


def test_the_diff_names_checksums_and_modes_never_contents(tmp_path):
    run(tmp_path)
    outcome = run(tmp_path, files(main=b"print('new')\n"))
    path = f"{LIB}/pkg/main.py"
    assert outcome.before["files"][path] == {"sha256": hashlib.sha256(CONTENTS[path]).hexdigest(), "mode": "0644",
                                             "owner": str(ME)}
    assert outcome.after["files"][path] == {"sha256": hashlib.sha256(b"print('new')\n").hexdigest(), "mode": "0644",
                                            "owner": str(ME)}
    assert "print" not in repr(outcome)


@pytest.mark.parametrize("path", ["relative/file.py", "/usr/lib/../../etc/passwd", "/usr/lib/example/..", "/", "",
                                  "/usr/\0lib"])
def test_paths_that_are_not_plain_absolute_guest_paths_are_refused(tmp_path, path):
    with pytest.raises(ClonesafeError) as error:
        parse_files([{"path": path, "content": "x"}])
    assert repr(path) in error.value.msg
    assert list(tmp_path.iterdir()) == []


def test_a_plain_path_is_normalised():
    assert guest_path("//usr/./lib//example/", "directory") == "/usr/lib/example"


@pytest.mark.parametrize("check_mode", [False, True])
def test_a_symlink_at_a_target_is_refused_and_what_it_points_to_untouched(tmp_path, check_mode):
    outside = tmp_path / "outside.py"
    outside.write_text("host file\n")
    root = tmp_path / "root"
    root.mkdir()
    run(root)
    target = root / "usr/lib/example/pkg/main.py"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ClonesafeError) as error:
        run(root, check_mode=check_mode)
    assert error.value.msg.startswith(f"{LIB}/pkg/main.py under the root {root} is a symlink (to '{outside}')")
    assert outside.read_text() == "host file\n" and target.is_symlink()


@pytest.mark.parametrize("check_mode", [False, True])
def test_a_symlinked_directory_below_the_root_is_refused_and_never_followed(tmp_path, check_mode):
    outside = tmp_path / "host-lib"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    # An image's absolute link would point at the host's own directory when followed from the host.
    (root / "usr/lib/example").symlink_to(outside)
    with pytest.raises(ClonesafeError) as error:
        run(root, check_mode=check_mode)
    assert error.value.msg.startswith(f"{LIB} under the root {root} is a symlink")
    assert list(outside.iterdir()) == []


def test_on_the_running_system_a_linked_directory_on_the_way_is_followed_a_listed_one_is_not(tmp_path):
    """Root / (follow_ancestor_links): /usr -> a data disk is the system's own layout, as copy followed it."""
    root = tmp_path / "root"
    (tmp_path / "data/usr/lib").mkdir(parents=True)
    root.mkdir()
    (root / "usr").symlink_to(tmp_path / "data/usr")
    install(str(root), DIRECTORIES, files(), False, ME, follow_ancestor_links=True)
    assert (tmp_path / "data/usr/lib/example/pkg/main.py").read_bytes() == CONTENTS[f"{LIB}/pkg/main.py"]
    # A listed directory that is a link is still refused, and a file that is a link too.
    (tmp_path / "elsewhere").mkdir()
    second = tmp_path / "second"
    (second / "var/lib").mkdir(parents=True)
    (second / "var/lib/example").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ClonesafeError) as error:
        install(str(second), DIRECTORIES, files(), False, ME, follow_ancestor_links=True)
    assert "/var/lib/example" in error.value.msg and "symlink" in error.value.msg
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_hard_linked_target_is_replaced_and_its_other_name_keeps_its_mode(tmp_path):
    run(tmp_path)
    target = tmp_path / LIB.strip("/") / "pkg/main.py"
    other = tmp_path / "other-name"
    os.link(target, other)
    os.chmod(other, 0o600)
    run(tmp_path)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.stat().st_nlink == 1
    assert stat.S_IMODE(other.stat().st_mode) == 0o600 and other.read_bytes() == CONTENTS[f"{LIB}/pkg/main.py"]


def test_a_symlink_as_the_root_itself_is_followed(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "image")
    run(tmp_path / "link")
    assert (tmp_path / "image/usr/lib/example/pkg/main.py").read_bytes() == CONTENTS[f"{LIB}/pkg/main.py"]


def test_something_else_than_a_file_at_a_target_is_refused_without_waiting(tmp_path):
    run(tmp_path)
    target = tmp_path / "usr/lib/example/pkg/main.py"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(ClonesafeError, match=r"/usr/lib/example/pkg/main.py under the root .* is not a regular file"):
        run(tmp_path)


def test_a_file_where_a_directory_must_be_is_refused(tmp_path):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/example").write_text("")
    with pytest.raises(ClonesafeError, match=r"^/usr/lib/example under the root .* is not a directory"):
        run(tmp_path)


def test_a_missing_root_is_named(tmp_path):
    with pytest.raises(ClonesafeError, match=r"^root .*/absent cannot be opened as a directory"):
        run(tmp_path / "absent")


def test_the_owner_is_made_root(tmp_path):
    if os.geteuid() != 0:
        missing_prerequisite("root", "run the unit tests as root (make test does) to check files are made root's")
    run(tmp_path)
    target = tmp_path / "usr/lib/example/pkg/main.py"
    os.chown(target, 1234, 1234)
    os.chown(tmp_path / "var/lib/example", 1234, 1234)
    outcome = install(str(tmp_path), DIRECTORIES, files(), False)
    assert outcome.files == [f"{LIB}/pkg/main.py"] and outcome.directories == ["/var/lib/example"]
    assert target.stat().st_uid == 0 and target.stat().st_gid == 0
    assert (tmp_path / "var/lib/example").stat().st_uid == 0
    assert outcome.before["files"][f"{LIB}/pkg/main.py"]["owner"] == "1234:1234"


def test_paths_listed_twice_or_as_file_and_directory_are_refused(tmp_path):
    with pytest.raises(ClonesafeError, match="listed twice"):
        parse_files([{"path": "/a/b", "content": ""}, {"path": "/a//b", "content": ""}])
    with pytest.raises(ClonesafeError, match="listed twice"):
        parse_directories([{"path": "/a"}, {"path": "/a/"}])
    with pytest.raises(ClonesafeError, match="^/usr/lib/example is listed as a file"):
        run(tmp_path, [FileSpec(LIB, b"")])
    with pytest.raises(ClonesafeError, match="^/a/b is listed as a file"):
        run(tmp_path, [FileSpec("/a/b", b""), FileSpec("/a/b/c", b"")], directories=[])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, mode", [("0644", 0o644), ("644", 0o644), ("0700", 0o700), ("2755", 0o2755),
                                         (0o644, 0o644)])
def test_modes_are_octal_strings_or_what_yaml_makes_of_unquoted_octal(value, mode):
    assert parse_mode(value, "file /x") == mode


@pytest.mark.parametrize("value", ["u=rw", "0o644", "999", "12345", True, None, 0o10000])
def test_other_modes_are_refused(value):
    with pytest.raises(ClonesafeError, match=r"^file /x has mode"):
        parse_mode(value, "file /x")


def test_the_root_of_the_running_system_and_image_roots():
    assert root_directory("") == root_directory("/") == "/"
    assert root_directory("/var/tmp/rootfs//") == "/var/tmp/rootfs"
    with pytest.raises(ClonesafeError, match="not an absolute path"):
        root_directory("rootfs")


def test_text_content_becomes_its_utf8_bytes_and_surrogate_escapes_the_original_bytes():
    [spec] = parse_files([{"path": "/a", "content": "\u00e9\udcff\n", "mode": "0600"}])
    assert spec.content == b"\xc3\xa9\xff\n" and spec.mode == 0o600


def test_the_logged_arguments_hold_no_content():
    params = {"root": "", "directories": [], "files": [{"path": "/a", "content": "secret-looking text\n", "mode": "0644"}]}
    logged = logged_arguments(params)
    assert logged["files"] == [{"path": "/a", "mode": "0644", "content": "(20 bytes)"}]
    assert params["files"][0]["content"] == "secret-looking text\n", "the module's own parameters are left alone"
