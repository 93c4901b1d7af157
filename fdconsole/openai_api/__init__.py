"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(a model id is a topic name), over the same submission, scheduling and streams as ``/api/v1/``."""
