"""Layer 1, the ground: configuration (schema, composition, validation), run-directory bookkeeping, the console, tracking, prompt suites. Imports nothing above it."""
