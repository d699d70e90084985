"""Feature store integration above the data layer: jobs.features' operations (ops), the online
lookup serving does (online), and the stream consumer that feeds the stores (stream)."""
