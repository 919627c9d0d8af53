"""igkd.report: figures and the markdown study report."""
