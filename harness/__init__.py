"""samenet: one CNN description, built identically in every framework, proven identical, measured.

The harness is framework-free: nothing under ``harness/`` imports a deep-learning framework.
"""

__version__ = "0.1.0"
