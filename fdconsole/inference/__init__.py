"""Inference requests: the persisted request object and its sync from the cluster's live state."""
