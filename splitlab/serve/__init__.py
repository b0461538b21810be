"""The OpenAI-compatible server over the online engine (``splitlab serve``) and a benchmark
client for any OpenAI-compatible server (``splitlab bench``).

- ``app``: the FastAPI app (``create_app``); ``protocol``: the wire format and error shape;
  ``text``: incremental detokenising and stop strings; ``metrics``: ``/metrics``.
- ``server``: ``splitlab serve`` (uvicorn, signals); ``bench``: ``splitlab bench``.

FastAPI, uvicorn, httpx and prometheus-client come with the ``serve`` extra
(``pip install -e '.[serve]'``); nothing outside this package imports them.
"""
