"""What the notebooks display: analyses that return numbers (reconstruction quality, attention),
the plots that draw them, and the interactive explorer."""
