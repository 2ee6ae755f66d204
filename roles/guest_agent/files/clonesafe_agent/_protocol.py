# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The wire and proof code shared with the collection's modules (one code parses both ends)."""

# pylint: disable=unused-import
try:
    from clonesafe_protocol import proof, replies, wire  # noqa: F401  as installed in the guest
except ImportError:  # run from a collection checkout (unit tests) rather than from the guest install
    from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire  # noqa: F401
