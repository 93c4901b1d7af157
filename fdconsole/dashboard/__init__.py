"""The web console: login, the cluster overview, and its live WebSocket feed."""
