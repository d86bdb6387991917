"""The cluster run: `engine.run --ray` on a Ray cluster (`distributed`), inputs and outputs behind URIs
(`remote`), and the Ray instance this project starts itself, reachable from this machine only
(`ray_local`, also used by the HTTP service). Ray is imported only when these modules are."""
