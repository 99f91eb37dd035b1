"""Tasks: the registered ``glue`` task."""
