"""The explain job kind, driver side: config, input plan, driver, explanation summaries."""
