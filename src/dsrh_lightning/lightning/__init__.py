"""The Lightning parts: the LightningModule, callbacks, loggers and run resources (precision, threads)."""
