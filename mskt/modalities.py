"""The three modalities, in the order every (B, 3) missing mask uses, and the ways some can be missing."""

MODALITIES = ("text", "audio", "vision")
# The six ways one or two of the three modalities can be missing (MMIN's fixed test conditions).
MISSING_PATTERNS = (("text",), ("audio",), ("vision",), ("text", "audio"), ("text", "vision"), ("audio", "vision"))
