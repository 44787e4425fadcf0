"""`prism discover`: a request log into domains, their central prompts and real queries for the next bootstrap."""
