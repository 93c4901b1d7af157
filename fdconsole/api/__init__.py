"""The REST API (``/api/v1/``): requests, topics, nodes, health; bearer-token authentication."""
