"""A Google Cloud Storage emulator on loopback (the `gcp-storage-emulator` package, a real
HTTP server speaking the JSON API), for tests of gs:// workdirs.

  with gcs_emulator.running() as env:   # env: the variables that point clients at it
    subprocess.run([...train.py, '--workdir=gs://bucket/run'], env={**os.environ, **env})

Every client lmjax uses is pointed at it: gcsfs (epath, so lmjax's own files and orbax's
metadata) through STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL. gcsfs's check for hierarchical-namespace buckets is a gRPC call
the emulator does not serve, so it is turned off.

It also holds a second bucket, READ_ONLY, that refuses every upload with 403 Forbidden and
Cloud Storage's own wording: what a bucket gives credentials that may read but not write.

Run as a script, this file serves the emulator with what it lacks and tensorstore's
checkpoint database (OCDBT) needs of Cloud Storage: an object's generation in the
`x-goog-generation` header of a download, and the conditions on it (`ifGenerationMatch` on
an upload, `ifGenerationNotMatch` and `ifGenerationMatch` on a download) that make a
database update atomic. Real Cloud Storage does both.
"""
import contextlib
import http
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = 'bucket'
READ_ONLY = 'read-only'
# What Cloud Storage answers an upload the credentials may not make.
FORBIDDEN = ('lmjax-test@example.iam.gserviceaccount.com does not have storage.objects.create '
             'access to the Google Cloud Storage object. Permission \'storage.objects.create\' '
             'denied on resource (or it may not exist).')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running():
  """Starts an emulator holding an empty bucket named BUCKET; yields the environment that
  points clients at it, which is also set in this process while it runs."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(port)],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'GOOGLE_CLOUD_PROJECT': 'test'}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2) as reply:
          if reply.status == 200:
            break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError('the storage emulator did not start '
                             f'(exit {server.poll()})') from None
        time.sleep(0.2)
    create = urllib.request.Request(f'{url}/storage/v1/b?project=test', method='POST',
                                    data=json.dumps({'name': READ_ONLY}).encode(),
                                    headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(create, timeout=10).close()
    os.environ.update(env)
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


def _generation(storage, bucket: str, name: str) -> int:
  """The object's generation; 0 if there is none (Cloud Storage's convention)."""
  from gcp_storage_emulator.exceptions import NotFound
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return 0


def _failed_condition(request, generation: int, match: str, not_match: str):
  """The status a request's generation conditions give, or None if they hold."""
  if match in request.query and int(request.query[match][0]) != generation:
    return http.HTTPStatus.PRECONDITION_FAILED
  if not_match in request.query and int(request.query[not_match][0]) == generation:
    return http.HTTPStatus.NOT_MODIFIED
  return None


def _serve(port: int) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  plain_download, plain_insert = objects.download, objects.insert

  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params['bucket_name'], request.params['object_id']
    generation = _generation(storage, bucket, name)
    failed = _failed_condition(request, generation, 'ifGenerationMatch',
                               'ifGenerationNotMatch')
    if failed is None:
      plain_download(request, response, storage, *args, **kwargs)
    else:
      response.status = failed
    if generation:
      response['x-goog-generation'] = str(generation)
      response['x-goog-metageneration'] = '1'

  def insert(request, response, storage, *args, **kwargs):
    if request.params['bucket_name'] == READ_ONLY:
      response.status = http.HTTPStatus.FORBIDDEN
      response.json({'error': {'code': 403, 'message': FORBIDDEN}})
      return None
    names = request.query.get('name')
    if names and 'ifGenerationMatch' in request.query:
      generation = _generation(storage, request.params['bucket_name'], names[0])
      if int(request.query['ifGenerationMatch'][0]) != generation:
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return None
    return plain_insert(request, response, storage, *args, **kwargs)

  objects.download = download  # objects.get serves ?alt=media through it
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      methods[method] = {plain_download: download, plain_insert: insert}.get(handler, handler)
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == '__main__':
  _serve(int(sys.argv[1]))
