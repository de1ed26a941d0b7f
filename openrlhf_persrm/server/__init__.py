"""The ``persrm serve`` application, one module per concern (the command line is :mod:`openrlhf_persrm.serve`).

:mod:`.config`          the server's settings (``ServeConfig``);
:mod:`.wire`            request bodies in, answers out (pure);
:mod:`.http`            the bearer token, bounded body reading, JSON answers;
:mod:`.admission`       the request clock (deadline arithmetic), retry sharing, the queue bound;
:mod:`.serving_reward`  ``POST /get_reward``;
:mod:`.serving_judge`   ``POST /judge``;
:mod:`.serving_health`  ``GET /health`` and the gate that refuses work while the judge is down;
:mod:`.app`             the server's state and its routes (``make_app``);
:mod:`.protocol`        uvicorn with header and idle timeouts (``running_server``, ``serve_forever``).

Importing this package is cheap; Starlette and uvicorn come with :mod:`.app` and the server.
"""
