"""``python -m tests.s3_server -H HOST -p PORT``: moto's S3 server, with conditional writes atomic as in S3.

moto 5.2.5 checks ``If-None-Match: *`` and ``If-Match`` in ``S3Response.put_object``
(moto/s3/responses.py) by reading the key and then storing the object, two steps
on a threaded server: two creates of one key that arrive together can both pass
the check, and both "succeed". Amazon S3 does not allow that: "If multiple
conditional writes occur for the same object name, the first write operation to
finish succeeds" and the others fail with 412 Precondition Failed (or 409
ConditionalRequestConflict, to be retried) -- AWS S3 User Guide, "How to prevent
object overwrites with conditional writes" (conditional-writes.html). Races
between our own writers (monitor claims, delivery records) are only tested
honestly against that behaviour, so here each PutObject and each POST to a key
(CompleteMultipartUpload, checked the same way in ``_key_response_post``) runs
its check and its store under one lock.
"""

from __future__ import annotations

import functools
import sys
import threading

from moto import server
from moto.s3.responses import S3Response

_WRITE = threading.Lock()


def _serialised(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _WRITE:
            return method(self, *args, **kwargs)

    return wrapper


S3Response.put_object = _serialised(S3Response.put_object)
S3Response._key_response_post = _serialised(S3Response._key_response_post)


if __name__ == "__main__":
    sys.exit(server.main(sys.argv[1:]))
