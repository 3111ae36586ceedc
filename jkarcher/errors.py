"""The base of every error that jkarcher raises for a user's input.

Each subclass says what was wrong in one line that names the file, tensor, model or field, so
that the command-line tools can print it as it is, without a traceback, and exit non-zero.
Errors that are not `JkarcherError`s are bugs.
"""


class JkarcherError(ValueError):
    """A user's config, checkpoint, output directory or call cannot be used as given."""


class MergeError(JkarcherError):
    """The inputs to a merge do not fit together; the message names the leaf and the model."""
