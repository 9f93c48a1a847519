"""ACPI: an AML encoder and the table structures; what goes in them is per-architecture."""
