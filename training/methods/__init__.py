"""Training methods: one plug-in per method."""
