"""``python -m demo.admin COMMAND [options]`` (installed as ``demo-admin``): see ``--help``.

A command's own options are parsed here (argparse); every other ``--name=value`` is a demo setting,
read with the server's own loader (demo.conf.settings.load: command line, ``DEMO_*`` environment,
``--config`` file), so a command sees exactly the settings ``python -m demo.main`` would.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from demo.admin import copy_media, images, sms, users
from demo.common.infra.startup import ConfigError

COMMANDS = (copy_media, users, sms, images)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and the settings' exit status (2), never a usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(ConfigError.status)


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m demo.admin",
        description="The operator's commands of demo. Settings are given as for python -m demo.main "
        "(--name=value, DEMO_NAME in the environment, --config=FILE); python -m demo.main --help lists them.",
        allow_abbrev=False,  # an abbreviation could swallow a setting's name
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


# A public id may begin with "-" (URL-safe base64), and argparse reads such a word as an option; a word
# of exactly a public id's shape is moved after "--", where argparse reads only positionals. No option
# or setting has that shape (settings are --name=value).
_DASHED_ID = re.compile(r"-[A-Za-z0-9_-]{21}")


def ids_as_positionals(argv: Sequence[str]) -> list[str]:
    """``argv`` with every word shaped like a public id that begins with "-" moved after "--"."""
    if "--" in argv:
        return list(argv)  # the operator separated them already
    ids = [word for word in argv if _DASHED_ID.fullmatch(word)]
    return [word for word in argv if word not in ids] + (["--", *ids] if ids else [])


def main(argv: Sequence[str] | None = None) -> int:
    words = ids_as_positionals(sys.argv[1:] if argv is None else argv)
    args, settings_args = build_parser().parse_known_args(words)
    status: int = args.run(args, settings_args)
    return status


if __name__ == "__main__":
    sys.exit(main())
