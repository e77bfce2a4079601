"""The report stage: paired statistics against the dense model, findings, charts, HTML pages and the
versioned artifacts folder, built from the per-item table alone (no model needed)."""
