"""Data: dataset shapes (presets), the in-memory dataset, readers for MulT and MMSA pickles, SDK
``.csd`` files and the HDF5 store, the synthetic generator, missing-modality masks, and batching.
Nothing here imports at package import time: ``from mskt.data.readers import load_dataset``."""
