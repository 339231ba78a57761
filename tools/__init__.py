"""fedtune.tools."""
