"""compiler/export."""
