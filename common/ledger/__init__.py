"""fedtune.common.ledger.chain."""
