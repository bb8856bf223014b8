"""Sources find or receive files and hand over paths that are complete on disk."""
