"""Kubernetes: reaching pods' cores from kubectl (and, later, the node agent's pod watch)."""
