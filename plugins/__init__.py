"""Built-in mqbroker plugins."""
