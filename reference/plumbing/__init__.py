"""The project's plumbing, on the lowest floor beside the model: what every floor uses and no model
code defines.

- `errors`: the one exception family (`PSPError`, `UsageError`, `CheckpointError`, `InputImageError`).
- `files`: the cache folder, atomic writes, folder scans, the output-folder lock.
- `digests`: file digests (sha256) remembered per file version; the checkpoint identity.
- `cli`: the CLI skeleton (`run_cli`: one-line errors, exit codes) and its argument types.
- `platform`: what this CPU can do (model name, flags, bf16 units), read from the CPU itself.
- `child`: one memory-heavy step in a child process of its own (`python -m reference.plumbing.child`).
"""
