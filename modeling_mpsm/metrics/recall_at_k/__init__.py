"""The `recall_at_k` metric module (see README.md)."""
