"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
  """Something the user gave (a config field, a flag, a file, a workdir) is wrong, or a run
  stopped for a reason the user must act on. The message names the problem and the fix;
  the entry scripts print it without a traceback and exit with status 1."""


def run_script(main, **kwargs) -> None:
  """absl's `app.run(main, **kwargs)` for the scripts in experiments/: a mistake the user
  can fix (a UserError, a missing file, a flag refused by `app.UsageError`) ends the process
  with one line, `error: ...`, and exit status 1, instead of a traceback or absl's whole
  help text before the message."""
  import sys

  from absl import app

  def checked_main(argv):
    try:
      return main(argv)
    except (app.UsageError, UserError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')

  app.run(checked_main, **kwargs)
