"""Nodes: the records of the cluster's workers, their admin actions, and the fdnode/fdcluster commands."""
