"""The OpenAPI 3.1 schema of ``/api/v1/`` and ``/v1/``, generated from the APIs' own registries and
pydantic models, and a docs page rendered from it."""
