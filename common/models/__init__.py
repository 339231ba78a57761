"""fedtune.common.models."""
