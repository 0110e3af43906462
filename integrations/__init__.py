"""Framework integrations, each reached only by its own path (e.g. `gradwatch.integrations.torch`)."""
