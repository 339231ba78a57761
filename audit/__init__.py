"""The auditor's role: verify nodes' epsilon ledgers, and audit a node's DP-SGD empirically.

Imports only ``fedtune.common`` (never client, server or sim code): an auditor checks
the nodes with code that is independent of theirs, apart from the shared format.
"""
