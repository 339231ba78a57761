"""fedtune.server."""
