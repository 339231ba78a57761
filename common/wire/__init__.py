"""fedtune.common.wire.contract."""
