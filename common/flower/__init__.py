"""fedtune.common.flower."""
