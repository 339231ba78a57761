"""fedtune.common.privacy."""
