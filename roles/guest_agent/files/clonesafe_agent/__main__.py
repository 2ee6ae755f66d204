# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Command line: clonesafe_agent [--root DIR] [--config PATH] {serve,boot-check,status,gate} [--trigger T]."""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_CONFIG_PATH
from .errors import AgentError
from .log import log


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="clonesafe guest agent")
    parser.add_argument("--root", default="/", help="directory every path is relative to (tests, offline images)")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="configuration file, relative to --root")
    parser.add_argument("command", choices=("serve", "boot-check", "status", "gate"))
    parser.add_argument("--trigger", choices=("session", "network"), default="session",
                        help="gate: what is about to start (a session, or a network interface's configuration)")
    options = parser.parse_args(argv)
    try:
        if options.command == "gate":
            # Imported here and nowhere else on its path: the gate's fast path loads no cryptography.
            from .gate import gate  # pylint: disable=import-outside-toplevel

            return gate(options.root, options.config, options.trigger)
        from .agent import Agent  # pylint: disable=import-outside-toplevel

        agent = Agent(options.root, options.config)
        if options.command == "serve":
            from .serve import serve  # pylint: disable=import-outside-toplevel

            serve(agent)
        elif options.command == "boot-check":
            result = agent.boot_check()
            print(json.dumps({"rotated": result is not None, "result": result}, sort_keys=True))
        else:
            agent.start()
            print(json.dumps(agent.hello(), indent=2, sort_keys=True))
    except (AgentError, OSError, ValueError) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
