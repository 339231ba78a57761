"""fedtune.common.data.table."""
