"""output: the trace document, the tables, the sinks and the writer."""
