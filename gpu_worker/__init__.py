"""The model side of a node: byte tokenizer, a small GPT with a KV cache, sampling and the engine.

Nothing here imports Django; only ``gpu_worker.tokenizer`` is safe to import without torch.
"""
