"""LoRA adapters merged into (or run beside) each rank's tensor-parallel shard: `files` reads what an adapter
holds from its headers, `plan` decides the rank's part (pure), `merge` applies it, `load` joins the loader's
path, `switch` changes adapters on a loaded model re-reading only the touched base rows."""
