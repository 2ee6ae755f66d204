"""Offline stand-in for the pip bootstrap script ansible-test downloads.

ansible-test creates each sanity virtualenv without pip, then runs a get-pip script it fetches from
the internet. This machine reaches package registries only, so this script takes its place: it
bootstraps the pip bundled with Python (ensurepip), then installs the pip version ansible-test asked
for from the configured package index. ensurepip runs in its own process because it points
PIP_CONFIG_FILE at /dev/null, which would hide the machine's pip configuration from the install.
"""

import subprocess
import sys

IGNORED_OPTIONS = {"--no-setuptools", "--no-wheel"}

subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q"] + [arg for arg in sys.argv[1:] if arg not in IGNORED_OPTIONS])
