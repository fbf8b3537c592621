"""The command lines' shared wrapper: a user's mistake ends in one paragraph, not a traceback.

`run_cli` wraps `absl.app.run` so that a mistake a user can make (a bad flag, a config problem,
missing data, ...: an `errors.UserError`) ends in one paragraph on stderr and exit code 1; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from absl import app, flags, logging

from resnet_jax import config_utils, cpu, errors


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> NoReturn:
    """`absl.app.run(main)` where a user's mistake ends in one paragraph on stderr and exit 1.

    User mistakes are flag and config-file errors and every `errors.UserError` (ConfigError,
    DataError, parallel.ParallelError, convert.ConversionError, ...); anything else is a bug and
    keeps its traceback.
    """
    cpu.setup_if_cpu()  # before JAX starts a backend: XLA reads its flags then
    quiet_library_info()

    def main_explaining_errors(args: list[str]) -> int | None:
        try:
            return main(args)
        except errors.UserError as error:
            exit_with_message(str(error))

    app.run(main_explaining_errors, argv=argv, flags_parser=_parse_flags_explaining_errors)
    raise AssertionError("app.run returns only by exiting")


def quiet_library_info() -> None:
    """Keep libraries' routine INFO lines (orbax, tfds) out of a command's log."""
    logging.get_absl_handler().addFilter(_only_our_info)


def _only_our_info(record: pylogging.LogRecord) -> bool:
    # Libraries (orbax, tfds) log routine INFO through absl too; keep theirs from WARNING up.
    return record.levelno >= pylogging.WARNING or f"{os.sep}resnet_jax{os.sep}" in record.pathname


def exit_with_message(message: str) -> NoReturn:
    """Print `message` as one paragraph on stderr and exit with status 1."""
    errors.print_error(message)
    sys.exit(1)


# What parsing the flags raises for a mistake on the command line: absl's errors, and a config
# file's (one that does not load or has a syntax error: config_flags runs the file while it parses
# --config; a key it lacks, a value of the wrong type).
FLAG_ERRORS = (
    flags.Error, AttributeError, ImportError, KeyError, OSError, SyntaxError, TypeError, ValueError,
)  # fmt: skip


def _parse_flags_explaining_errors(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a config file that failed to load raises only when read
        return remaining
    except FLAG_ERRORS as error:
        exit_with_message(explain_flag_error(error, argv))


def explain_flag_error(error: Exception, argv: list[str]) -> str:
    """The one-paragraph message for a FLAG_ERRORS `error` raised parsing `argv`: the problem and
    its fix (an unknown config key with the closest known ones, a config file that does not load,
    ...)."""
    if isinstance(error, SyntaxError):
        code = f" (`{error.text.strip()}`)" if error.text and error.text.strip() else ""
        return (
            f"Cannot load the config file: a Python syntax error in {error.filename} at line "
            f"{error.lineno}{code}: {error.msg}. Fix that line and run again."
        )
    known = list(config_utils.flatten(config_utils.default_config()))
    overrides = [m.group(1) for a in argv if (m := re.match(r"^--?(?:no)?config\.([\w.]+)", a))]
    unknown = [key for key in overrides if key not in known]
    if unknown:
        return (
            "Unknown config key"
            + ("s " if len(unknown) > 1 else " ")
            + "; ".join(
                config_utils.unknown_key_problem(key, known).removeprefix("unknown key ")
                for key in unknown
            )
            + f". {config_utils.BASE_CONFIG} lists every key with its meaning."
        )
    detail = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = detail[-1] if detail else type(error).__name__
    if "Could not override field" in str(error):  # the file sets a key to another type
        return (
            f"The config file sets a key to a value of the wrong type: {reason}. Fix the value in "
            f"the config file; {config_utils.BASE_CONFIG} lists every key with its type and "
            "meaning."
        )
    if "Error whilst parsing config file" in str(error) or isinstance(error, OSError | ImportError):
        recipes = sorted(p.name for p in Path("configs").glob("*.py"))  # in a source checkout
        listed = f" (configs/ here holds {', '.join(recipes)})" if recipes else ""
        return (
            f"Cannot load the config file: {reason}. Pass an existing config file that defines "
            f"get_config(), e.g. --config=configs/r50.py{listed}; a recipe of your own starts "
            "from `from resnet_jax import base_config`."
        )
    return f"{reason}. Run with --helpfull to see every flag."
