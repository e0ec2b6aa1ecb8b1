"""The tamper-evident audit trail (docs/compliance.md): an RFC 6962 Merkle log of every served request in SQL,
signed checkpoints, the AuditService, retention, and the archive of final explanation records."""
