"""hsd tlslite plugin."""
