"""fedtune.sim."""
