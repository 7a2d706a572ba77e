"""Engine integrations: each adapts one engine's KV layout to the Shelf API."""
