"""The product's face: the v1 -> v2 transformer, I/O pipelines, upgrade, service and CLIs."""
