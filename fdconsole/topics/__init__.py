"""Topics: a topic is a group of nodes that schedule together, with its scheduler configuration."""
