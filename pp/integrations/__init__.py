"""Drop-in adapters that route an engine's PP send/recv through pipepack."""
