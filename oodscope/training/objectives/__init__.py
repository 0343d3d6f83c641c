"""Training objectives, one module per method (registered as family ``training``; see ``..objective``)."""
