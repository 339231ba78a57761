"""fedtune.client."""
