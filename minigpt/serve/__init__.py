"""`minigpt serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

`app.py` holds the routes and request schemas, `scheduler.py` the decoding loop that owns the model,
`metrics.py` the Prometheus metrics and `static/` the page. Needs the `serve` extra (FastAPI, uvicorn,
prometheus_client): ``pip install 'minigpt[serve]'``.
"""
