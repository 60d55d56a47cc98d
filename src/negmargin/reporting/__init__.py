"""Results tables, margin-analysis plots and the run summary."""
