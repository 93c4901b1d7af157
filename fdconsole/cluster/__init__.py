"""Running the cluster: ``fdcluster`` (the whole system), ``fdnode`` (one node), ``fdbench`` (the
benchmarks), and the hooks that keep the database up to date from a node."""
