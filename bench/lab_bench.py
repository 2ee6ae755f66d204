# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's two costs: building the golden image from Debian packages, and booting it to userspace.

Run from the repository root, as root, after `make collection` (libvirtd running, e.g. after `make lab`):

    .venv/bin/python bench/lab_bench.py [--boots 3] [--skip-build]

1. Image build: the clonesafe.fleet.golden_image role into a fresh, empty cache directory (so nothing
   is reused), then the same run again (the cached case: changed=0).
2. Boot: a throw-away domain on a thin overlay of the lab's image (TCG unless the lab probed KVM),
   timed from `golden_domain state=running` to the "clonesafe-lab: userspace reached" line on its
   serial console, `--boots` times.

Not a test: it prints numbers and a JSON line. Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from clonesafe_testlib import run_module, run_playbook  # noqa: E402  pylint: disable=wrong-import-position

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
MARKER = "clonesafe-lab: userspace reached"
BUILD_PLAYBOOK = """
- hosts: localhost
  gather_facts: true
  roles:
    - role: clonesafe.fleet.golden_image
"""


def bench_build(work: pathlib.Path) -> dict[str, float]:
    playbook = work / "build.yml"
    playbook.write_text(BUILD_PLAYBOOK)
    cache = work / "cache"
    timings = {}
    for label in ("first_build_s", "cached_rerun_s"):
        started = time.monotonic()
        run = run_playbook(playbook, "-e", f"golden_image_cache_dir={cache}", timeout=3600)
        timings[label] = round(time.monotonic() - started, 1)
        if run.returncode != 0:
            raise SystemExit(f"image build failed:\n{run.stdout[-4000:]}")
    if run.recap()["changed"] != 0:
        raise SystemExit("the cached re-run changed something")
    return timings


def bench_boot(lab: dict, work: pathlib.Path, index: int) -> float:
    name = f"clonesafe-bench-boot-{uuid.uuid4().hex[:6]}"
    disk = work / f"{name}.qcow2"
    console = work / f"{name}.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", lab["image"]["disk"], str(disk)], check=True)
    args = {"uri": lab["uri"], "name": name, "state": "running", "disk": str(disk), "kernel": lab["image"]["kernel"],
            "initrd": lab["image"]["initrd"], "cmdline": lab["image"]["cmdline"], "console_log": str(console),
            "channel_socket": f"/var/lib/clonesafe/channels/{name}.sock", "domain_type": lab["domain_type"],
            "memory_mib": 512, "vcpus": 2}
    try:
        started = time.monotonic()
        code, result = run_module("clonesafe.fleet.golden_domain", args)
        if code != 0:
            raise SystemExit(f"boot {index} failed: {result.get('msg')}")
        while MARKER not in (console.read_text(errors="replace") if console.exists() else ""):
            if time.monotonic() - started > 900:
                raise SystemExit(f"boot {index}: no '{MARKER}' within 900 s")
            time.sleep(0.2)
        return round(time.monotonic() - started, 1)
    finally:
        run_module("clonesafe.fleet.golden_domain", {"uri": lab["uri"], "name": name, "state": "absent"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    lab = json.loads(LAB_SUMMARY.read_text())
    work = pathlib.Path(tempfile.mkdtemp(prefix="clonesafe-lab-bench-", dir="/var/tmp"))
    try:
        results: dict[str, object] = {"domain_type": lab["domain_type"]}
        if not args.skip_build:
            results.update(bench_build(work))
            print(json.dumps(results), flush=True)
        boots = [bench_boot(lab, work, index) for index in range(args.boots)]
        results.update(boot_to_userspace_s=boots, boot_median_s=statistics.median(boots))
        print("RESULT " + json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
