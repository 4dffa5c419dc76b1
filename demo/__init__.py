"""The demos behind ``make demo`` and ``make demo-finetune``: run from a checkout (they build real
weights and speech with the test fixtures), never shipped in a wheel."""
