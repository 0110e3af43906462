"""Framework integrations, each reached by its own path, e.g. gradwatch.integrations.torch."""
