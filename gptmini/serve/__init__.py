"""Serving a checkpoint over HTTP: the OpenAI-compatible API and a chat page, what ``python serve.py`` runs.

    config    ServeConfig: every option of serve.py, checked before the checkpoint loads
    protocol  OpenAI request bodies to generation requests (or an error naming the field), and the replies
    engine    continuous batching: a scheduler and one batched decoding step over ``max_batch`` KV-cache slots
    app       the FastAPI app: routes, auth, CORS, body limits, server-sent events
    run       serve(cfg): load, start the engine and uvicorn, shut down cleanly on Ctrl-C or SIGTERM
    page.html the chat page (one self-contained file)

The token loop is generation's (``gptmini.generation.sampling`` and ``streaming``): the server adds batching
and scheduling, not a second sampler. A chat is rendered with the checkpoint's template by
``gptmini.data.chat_template``, the renderer training and generate.py use. May import ``model``,
``generation``, ``weights``, ``data.tokenizer``, ``data.chat_template`` and ``common``; must not import
``training``.
"""
