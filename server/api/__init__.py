"""The HTTP API (FastAPI): routes, schemas, uploads, the edge middleware, auth dependencies. No tensor math:
requests become engine calls (``server.engine``) through the runtime state (``server.state``)."""
