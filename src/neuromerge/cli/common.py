"""What several commands share: option parsers and checks, and the ``neuromerge`` logger."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from neuromerge.errors import ConfigError

log = logging.getLogger("neuromerge")


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("neuromerge: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device {cpu,cuda,auto}`` of the commands that compute with torch (merge, analyze,
    statistics)."""
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where to compute (default: cpu)")


def key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("parameters.")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def at_least(flag: str, value: int | None, minimum: int) -> None:
    """A numeric option below its minimum is a usage error (None: the option was not given)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum} (got {value})")


def floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r} (expected numbers separated by "
                          f"commas, e.g. 0.1,0.2,0.5)") from None
    if not values:
        raise ConfigError(f"{what}: no values in {text!r}")
    return values
