"""Serving an export: an OpenAI-compatible Chat Completions server and a chat page (`python -m pipeline.serve`).

- chat.py: a request body -> a checked generation prompt (messages, images, decoding settings, limits)
- batcher.py: the model's worker thread; requests arriving together share one KV-cache batch
- app.py: the FastAPI routes (/v1/chat/completions, /v1/models, /health, the page at /) and OpenAI-style errors
- cli.py: the command line (`pill-serve`)
- page.py: the chat page (upload an image, ask, watch the answer stream)

FastAPI and uvicorn come with the `serve` extra (`pip install pill-train[serve]`).
"""
