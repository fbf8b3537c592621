"""The errors a user can cause and fix, and how one is shown.

Every such error subclasses `UserError`, whichever module raises it: the command lines print its
message as one paragraph and exit with status 1 (`cli.run_cli`); any other exception is a bug and
keeps its traceback. The errors raised by several modules live here; one module's own (e.g.
`checkpoint.CheckpointError`) lives in that module.
"""

from __future__ import annotations

import sys
import textwrap


# A ValueError, so code and tests that catch ValueError catch every user error too.
class UserError(ValueError):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(UserError):
    """A config (or workdir) problem the user can fix; the message says how."""


class DataError(UserError):
    """A problem with the data the user can fix; the message names the problem and the fix."""


def print_error(message: str) -> None:
    """Print `message` on stderr as one paragraph, "Error: ...", wrapped at 100 columns."""
    text = " ".join(message.split())
    # Paths and flags stay whole, so they can be copied from the message.
    paragraph = textwrap.fill(
        f"Error: {text}", width=100, break_long_words=False, break_on_hyphens=False
    )
    print(f"\n{paragraph}\n", file=sys.stderr, flush=True)
