"""OpenAI-compatible HTTP front end for adasd (vLLM-style layout).

    app                  FastAPI app factory, thin routes, middleware (API key, body size), run(settings)
    protocol             pydantic request / response models
    serving*             one serving class per endpoint: request -> response | SSE stream | error
    engine_client        the front end's side of the worker: submit, stream, cancel, supervise, restart
    worker               the worker process: loads the pair once, interleaves generations round-robin
    metrics              Prometheus export of the worker's per-request statistics
    settings             flat settings: flags > ADASD_* env > YAML > defaults
    errors               OpenAI-shaped errors

Importing this package loads nothing heavy: the worker process imports it under `spawn`.
"""
