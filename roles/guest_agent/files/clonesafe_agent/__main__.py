# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Command line: clonesafe_agent [--root DIR] [--config PATH] {serve,boot-check,status}."""

from __future__ import annotations

import argparse
import json
import sys

from .agent import Agent
from .config import DEFAULT_CONFIG_PATH
from .errors import AgentError
from .log import log
from .serve import serve


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="clonesafe guest agent")
    parser.add_argument("--root", default="/", help="directory every path is relative to (tests, offline images)")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="configuration file, relative to --root")
    parser.add_argument("command", choices=("serve", "boot-check", "status"))
    options = parser.parse_args(argv)
    try:
        agent = Agent(options.root, options.config)
        if options.command == "serve":
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
