"""The baseline for bench_store's API downloads: a bare static-file server (Starlette's
StaticFiles under the same uvicorn settings as `convoy api`) on the artifact folder."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

app = Starlette(routes=[Mount("/", StaticFiles(directory=os.environ["BARE_STATIC_ROOT"]))])

if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run("bench.bare_static:app", host="127.0.0.1", port=int(sys.argv[1]), workers=1,
                log_level="warning")
