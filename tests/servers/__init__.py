"""Real HTTP servers on 127.0.0.1 that stand in for the systems the toolkit talks to (tests and the demo)."""
