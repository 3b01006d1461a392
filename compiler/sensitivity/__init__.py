"""compiler/sensitivity."""
