"""Code a test plants in Redis, as the function, a callback or a webhook of a request's rq job hash: a
node must never import or call it. Importing it, or calling ``record``, leaves a mark on disk (at
FD_PLANTED_MARK), so that a test can tell, in this process or in a node's."""

import os
from pathlib import Path

MARK = os.environ.get("FD_PLANTED_MARK")
if MARK:
    Path(MARK).with_suffix(".imported").touch()


def record(*args, **kwargs) -> None:
    if MARK:
        Path(MARK).with_suffix(".called").touch()
