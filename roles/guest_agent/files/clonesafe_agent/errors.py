# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's one error type."""


class AgentError(Exception):
    """A failure the agent reports instead of crashing."""
