"""The ``dinolab`` command: parse, call, report. No training logic lives here."""

from __future__ import annotations

import argparse
import sys

from dinolab.config import ConfigError, load_config, preset_names

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="pre-train a backbone with DINO (resumes when the run folder has a checkpoint)",
        description="dinolab train [PRESET_OR_YAML] [key=value ...]; with no preset or YAML "
        f"the demo preset is the base. Presets: {', '.join(preset_names())}.",
    )
    train.add_argument("arguments", nargs="*", metavar="PRESET_OR_YAML|key=value")
    return parser


def _split(arguments: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the preset or YAML; the rest are overrides."""
    if arguments and "=" not in arguments[0]:
        return arguments[0], arguments[1:]
    return None, arguments


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        base, overrides = _split(arguments.arguments)
        config = load_config(base, overrides)
        from dinolab.training.loop import NonFiniteLoss, train

        try:
            train(config)
        except NonFiniteLoss as error:
            print(f"dinolab: error: {error}", file=sys.stderr)
            return EXIT_NON_FINITE
    except ConfigError as error:
        print(f"dinolab: error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
