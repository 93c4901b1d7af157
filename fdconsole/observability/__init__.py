"""Prometheus metrics of the whole cluster, read from each topic's Redis when ``/metrics`` is scraped.

Design note. Nodes run on many hosts, and the console may run as several processes: nothing is
counted in the console's memory. The scripts count as requests move (``scheduler/lua``: the ``stats``
and ``metrics`` hashes of each topic, latency histograms on the finish path), the nodes add what only
they know (inter-token latency, preemptions) in their step's one round trip, and the console adds its
refusals. A scrape reads all of it back, with the nodes' heartbeats and queues, through a custom
collector on a private registry (``collector.ClusterCollector``).
"""
