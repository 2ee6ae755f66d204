"""Find the Debian mirror the build host's apt already uses, for debootstrap.

Usage: detect_mirror.py SUITE [APT_ETC_DIR]

Prints a JSON object {"mirror": URI or "", "source": file it came from or ""}.
A stanza (deb822 *.sources) or line (one-line *.list) of type "deb" that lists SUITE wins;
otherwise the first Debian archive entry (URI path ending in /debian) is used. Security,
updates and backports archives are not the distribution archive and are skipped. An empty
answer means the caller falls back to its default mirror.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

SUPPORTED_SCHEMES = ("http://", "https://", "file:/")
SKIPPED_SUITE_SUFFIXES = ("-security", "-updates", "-backports", "-proposed-updates")


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Split a deb822 file into stanzas of lower-cased field names to values."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last_key = {}, ""
            continue
        if raw[0] in " \t" and last_key:
            current[last_key] += " " + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if sep:
            last_key = key.strip().lower()
            current[last_key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def entries_from_deb822(text: str) -> list[tuple[list[str], list[str]]]:
    """Return (uris, suites) of every enabled deb stanza."""
    entries = []
    for stanza in parse_deb822(text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        entries.append((stanza.get("uris", "").split(), stanza.get("suites", "").split()))
    return entries


def entries_from_list(text: str) -> list[tuple[list[str], list[str]]]:
    """Return (uris, suites) of every one-line 'deb URI SUITE ...' entry."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        # Drop the optional [ key=value ... ] block.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "deb":
            entries.append(([fields[1]], [fields[2]]))
    return entries


def is_usable(uri: str, suite: str) -> bool:
    """Whether debootstrap can fetch the distribution archive from this URI and suite."""
    return uri.startswith(SUPPORTED_SCHEMES) and not suite.endswith(SKIPPED_SUITE_SUFFIXES)


def pick_mirror(entries: list[tuple[str, list[tuple[list[str], list[str]]]]], suite: str) -> tuple[str, str]:
    """Pick (mirror, source file) for SUITE from (file, entries) pairs, or ("", "")."""
    fallback = ("", "")
    for source, file_entries in entries:
        for uris, suites in file_entries:
            for uri in uris:
                usable = [s for s in suites if is_usable(uri, s)]
                if suite in usable:
                    return uri.rstrip("/"), source
                if usable and not fallback[0] and uri.rstrip("/").endswith("/debian"):
                    fallback = (uri.rstrip("/"), source)
    return fallback


def read_sources(apt_etc: str) -> list[tuple[str, list[tuple[list[str], list[str]]]]]:
    """Read the apt source files under APT_ETC_DIR in apt's own order."""
    found = []
    main_list = os.path.join(apt_etc, "sources.list")
    paths = [main_list] if os.path.isfile(main_list) else []
    paths += sorted(glob.glob(os.path.join(apt_etc, "sources.list.d", "*.list")))
    paths += sorted(glob.glob(os.path.join(apt_etc, "sources.list.d", "*.sources")))
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        parser = entries_from_deb822 if path.endswith(".sources") else entries_from_list
        found.append((path, parser(text)))
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: detect_mirror.py SUITE [APT_ETC_DIR]", file=sys.stderr)
        return 2
    suite = argv[1]
    apt_etc = argv[2] if len(argv) > 2 else "/etc/apt"
    mirror, source = pick_mirror(read_sources(apt_etc), suite)
    print(json.dumps({"mirror": mirror, "source": source}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
