"""Parquet click logs -> Batches, and the built-in synthetic click-log generator."""
