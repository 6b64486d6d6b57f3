"""Where lmjax keeps its files: a local directory or a bucket (`gs://bucket/run`), through
one set of calls.

Local paths use the OS's own calls. Paths with a scheme (`gs://...`) go through etils'
epath, the layer orbax writes checkpoints with, and from there through fsspec's `gcsfs`
(the `gcs` extra), so every part of lmjax reaches a bucket the same way and a test can
point all of them at a Cloud Storage emulator (STORAGE_EMULATOR_HOST). epath would
otherwise pick TensorFlow's GCS client, which speaks only to Google's own endpoint.

Replacing a file atomically: a local file is written under a temporary name and renamed
over the old one, so a kill mid-write leaves the old file whole. A bucket has no rename,
but an object upload is atomic (a reader sees the old object or the new one, never a
part), so a remote file is written in place. Moving a directory in a bucket copies each
object and deletes the original: not atomic, and only done to set a damaged checkpoint
aside.
"""
import functools
import importlib.util
import os
import shutil

from lmjax.errors import UserError

# Before epath first resolves a gs:// path (it caches the choice). A user's own setting wins.
os.environ.setdefault('EPATH_USE_TF', 'false')


def is_remote(path: str) -> bool:
  """Whether `path` names a bucket (it has a scheme, as in gs://bucket/run)."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a remote one as given."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def _remote(path: str):
  if not str(path).startswith('gs://'):
    raise UserError(f'{path}: lmjax reaches buckets at gs:// only; give a gs:// path or a '
                    'local one.')
  if not importlib.util.find_spec('gcsfs'):
    raise UserError(f'{path} is in a bucket, and reaching one needs gcsfs: '
                    "pip install -e '.[gcs]' (or .venv/bin/pip install gcsfs).")
  from etils import epath
  _no_listings_cache()
  return epath.Path(path)


@functools.cache
def _no_listings_cache() -> None:
  """Each process sees what the others wrote (a sweep reads its points' results): no
  listing is answered from a cache. Set once, before gcsfs's first file system."""
  import fsspec
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


def _on_bucket(path: str, act):
  """act(the epath.Path of `path`); the bucket refusing it (HTTP 401 or 403: credentials
  missing, expired or without that permission) becomes one line naming the path and the fix."""
  target = _remote(path)
  try:
    return act(target)
  except Exception as e:
    # gcsfs raises OSError('Forbidden: PATH\nREASON') on a 403, HttpError (.code) on a 401.
    if getattr(e, 'code', None) not in (401, 403) and not str(e).startswith('Forbidden'):
      raise
    reason = str(e).strip().splitlines()[-1].rstrip('.')
    raise UserError(f'{path}: the bucket refused it ({reason}). Give the credentials this '
                    'process uses (GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth '
                    'application-default login) access to the bucket, or name another '
                    'workdir.') from e


def exists(path: str) -> bool:
  return _on_bucket(path, lambda p: p.exists()) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _on_bucket(path, lambda p: p.is_dir()) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _on_bucket(path, lambda p: p.is_file()) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in directory `path` (a bucket's: the next level under that prefix)."""
  if is_remote(path):
    return _on_bucket(path, lambda p: [inner.name for inner in p.iterdir()])
  return os.listdir(path)


def makedirs(path: str) -> None:
  """Creates directory `path` and its parents. A bucket has no directories: there it only
  checks that the bucket exists (gcsfs would create a missing one, in whatever project the
  credentials name)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    return
  _remote(path)  # a bucket lmjax can reach at all
  bucket = '/'.join(str(path).split('/')[:3])
  if not exists(bucket):
    raise UserError(f'{path}: there is no bucket {bucket} that these credentials can see; '
                    f'create it (gcloud storage buckets create {bucket}) or name another.')


def remove(path: str) -> None:
  if is_remote(path):
    _on_bucket(path, lambda p: p.unlink())
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    _on_bucket(path, lambda p: p.rmtree())
  else:
    shutil.rmtree(path)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _on_bucket(path, lambda p: p.read_bytes())
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` whole, replacing any old file atomically (see the module's note)."""
  if is_remote(path):
    _on_bucket(path, lambda p: p.write_bytes(data))
    return
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def move(source: str, target: str) -> None:
  """Moves file or directory `source` to `target`, whose parent is created."""
  if is_remote(source) or is_remote(target):
    if isdir(source):
      copy_tree(source, target)
      rmtree(source)
    else:
      write_bytes(target, read_bytes(source))
      remove(source)
  else:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(source, target)


def copy_tree(source: str, target: str) -> None:
  """Copies every file under directory `source` to the same place under `target` (either
  may be remote); files already in `target` are replaced."""
  for name in listdir(source):
    inner = os.path.join(source, name)
    if isdir(inner):
      copy_tree(inner, os.path.join(target, name))
    else:
      makedirs(target)
      write_bytes(os.path.join(target, name), read_bytes(inner))
