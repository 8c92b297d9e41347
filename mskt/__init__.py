"""mskt: multimodal sentiment analysis with a missing modality, by knowledge transfer.

Importing the package has no side effects: no device is touched, no file is written,
no global torch state is changed.
"""

__version__ = "0.1.0"
