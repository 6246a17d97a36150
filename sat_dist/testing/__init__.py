"""Helpers shared by tests/ and bench/ (never imported by the library itself; an import contract
checks it): `dist` forks N ranks with a real gloo process group, `zero3_writer` writes DeepSpeed's
exact ZeRO-3 layout for benchmark-sized models that real DeepSpeed training cannot produce here."""
