# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Side by side on the lab golden: thin clones with clonesafe.fleet.clone versus virt-clone, and
parallel memory-clone restores timed until every guest has seen its VM Generation ID change.

Run from the repository root, as root, with the lab up (`make lab`):

    .venv/bin/python bench/clone_bench.py [--clones 100] [--virt-clones 3] [--restore 4 8]

Installs virt-clone (Debian package virtinst) with apt-get if it is missing. Not a test: it prints
numbers. Everything it creates (templates, clones, copies) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "collections"))
sys.path.insert(0, str(REPO / "tests"))

from clonesafe_testlib import run_module  # noqa: E402  (the tests' helper runs modules the way users do)

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402

FORK_LINE = "crng reseeded due to virtual machine fork"


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def ensure_virt_clone() -> str:
    path = shutil.which("virt-clone")
    if path:
        return path
    print("installing virtinst (virt-clone) with apt-get ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "virtinst"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    return shutil.which("virt-clone") or sys.exit("virt-clone is still missing after installing virtinst")


def module(module_name, **args):
    code, result = run_module(f"clonesafe.fleet.{module_name}", args)
    if code != 0:
        raise SystemExit(f"{module_name} failed: {result.get('msg')}")
    return result


def bench_thin_clones(uri, golden, count, virt_clones, tag):
    name = f"bench{tag}-disk"
    made = module("golden_snapshot", uri=uri, name=name, golden=golden)["template"]
    try:
        started = time.monotonic()
        result = module("clone", uri=uri, template=name, count=count, start="none", parallel=4)
        ours_total = time.monotonic() - started
        assert len(result["clones"]) == count
        ours = ours_total / count

        virt_clone = ensure_virt_clone()
        with open(os.path.join(made["directory"], "manifest.json"), encoding="utf-8") as handle:
            source_xml = json.load(handle)["source"]["xml"]
        root = ET.fromstring(source_xml)
        root.find("devices/disk/source").set("file", made["base"])
        work = tempfile.mkdtemp(prefix="virt-clone-", dir="/var/lib/clonesafe/clones")
        xml_path = os.path.join(work, "golden.xml")
        pathlib.Path(xml_path).write_text(ET.tostring(root, encoding="unicode"))
        times = []
        names = []
        try:
            for index in range(virt_clones):
                clone_name = f"bench{tag}-vc{index}"
                names.append(clone_name)
                started = time.monotonic()
                subprocess.run([virt_clone, "--connect", uri, "--original-xml", xml_path, "--name", clone_name,
                                "--file", os.path.join(work, f"{clone_name}.qcow2"), "--check", "all=off"],
                               check=True, stdout=subprocess.DEVNULL)
                times.append(time.monotonic() - started)
        finally:
            with LibvirtConnection(uri) as conn:
                for clone_name in names:
                    domain = conn.find_domain(clone_name)
                    if domain is not None:
                        domain.undefine()
                # virt-clone defines a directory storage pool for the disks' directory: remove ours.
                for pool in conn.conn.listAllStoragePools(0):
                    if ET.fromstring(pool.XMLDesc(0)).findtext("target/path") in (work, made["directory"]):
                        if pool.isActive():
                            pool.destroy()
                        pool.undefine()
            shutil.rmtree(work)
        theirs = sum(times) / len(times)
        print(f"thin clones, created + defined, not started ({count} with clonesafe.fleet.clone, {virt_clones} with virt-clone):")
        print(f"  clonesafe.fleet.clone: {ours_total:.2f} s for {count} = {ours * 1000:.1f} ms per clone "
              f"(module's own per-clone times: median {sorted(c['seconds'] for c in result['clones'])[count // 2] * 1000:.1f} ms)")
        print(f"  virt-clone (full copy of the same golden disk): {', '.join(f'{t:.2f}' for t in times)} s -> {theirs:.2f} s per clone")
        print(f"  ratio: {theirs / ours:.0f}x")
    finally:
        module("golden_snapshot", uri=uri, name=name, state="absent", force=True)


def bench_restores(uri, golden, counts, tag):
    name = f"bench{tag}-mem"
    module("golden_snapshot", uri=uri, name=name, golden=golden, memory=True)
    try:
        for count in counts:
            with LibvirtConnection(uri) as conn:
                request = clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                         clones_dir=clones.DEFAULT_CLONES_DIR, count=count, state="running",
                                         start="restore", network="held", parallel=count,
                                         name_pattern=f"{{template}}-{count}-{{index:02d}}")
                logs = [os.path.join(clones.DEFAULT_CLONES_DIR, f"{name}-{count}-{i:02d}", "console.log")
                        for i in range(1, count + 1)]
                seen = {}
                started = time.monotonic()
                done = threading.Event()
                report_box = []
                worker = threading.Thread(target=lambda: report_box.append(clones.ensure_clones(conn, runner, request, False)) or done.set())
                worker.start()
                while len(seen) < count and time.monotonic() - started < 300:
                    for log in logs:
                        if log not in seen:
                            try:
                                if FORK_LINE in pathlib.Path(log).read_text(errors="replace"):
                                    seen[log] = time.monotonic() - started
                            except FileNotFoundError:
                                pass
                    time.sleep(0.01)
                worker.join()
                module_total = time.monotonic() - started
                report = report_box[0]
                failed = [r.line() for r in report.failed]
                print(f"{count} memory clones restored in parallel (network held):")
                print(f"  every guest saw its genid change after {max(seen.values()):.2f} s "
                      f"(first {min(seen.values()):.2f} s; {len(seen)}/{count} seen)" if seen else "  no guest saw a genid change")
                print(f"  module done (incl. NIC swap to each clone's own MAC) after {module_total:.2f} s" + (f"; FAILED: {failed}" if failed else ""))
                clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                                  clones_dir=clones.DEFAULT_CLONES_DIR, state="absent"), False)
    finally:
        module("golden_snapshot", uri=uri, name=name, state="absent", force=True)


def main() -> None:
    lab = json.loads(pathlib.Path("/var/lib/clonesafe/lab.json").read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=lab["uri"])
    parser.add_argument("--golden", default=lab["golden"]["name"])
    parser.add_argument("--clones", type=int, default=100)
    parser.add_argument("--virt-clones", type=int, default=3)
    parser.add_argument("--restore", type=int, nargs="*", default=[4, 8])
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:4]
    bench_thin_clones(args.uri, args.golden, args.clones, args.virt_clones, tag)
    if args.restore:
        bench_restores(args.uri, args.golden, args.restore, tag)


if __name__ == "__main__":
    main()
