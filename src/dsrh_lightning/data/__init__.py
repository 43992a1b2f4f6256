"""Data: sources (arrays + labels), protocol splits, triplet sampling, the LightningDataModule."""
