"""Built-in behaviour, implemented as ordinary plugins."""
