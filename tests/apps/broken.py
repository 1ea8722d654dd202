"""An app whose script raises in its module body, on every session."""

raise RuntimeError("broken app exploded on purpose")
