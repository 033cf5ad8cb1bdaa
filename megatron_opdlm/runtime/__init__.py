"""Process start-up: distributed init, parallel state, seeding, logging, CPU compatibility."""
