"""Framework-free scheduling core: configuration, wire messages, Redis keys and the schedulers.

Nothing here imports Django or torch. The console and the node workers build on it.
"""
