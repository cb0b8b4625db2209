"""Training methods (CDC, SPICE) and the pseudo-label selection strategies they share."""
