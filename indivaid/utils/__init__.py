"""Small shared helpers: atomic files, locks, hashing, logging."""
