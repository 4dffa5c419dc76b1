"""One module per benchmark section; each has ``run(settings) -> dict`` (JSON-ready)."""

SECTIONS = ("single", "concurrency", "padding", "quantization", "conversion", "scaling", "merge", "service", "soak", "field", "batch", "promotion",
            "multimodel", "realtime")
