"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
  """Something the user gave (a config field, a flag, a file, a workdir) is wrong, or a run
  stopped for a reason the user must act on. The message names the problem and the fix;
  the entry scripts print it without a traceback and exit with status 1."""
