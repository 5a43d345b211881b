"""Scale-out on Ray: `kiln batch` (Ray Data over an actor pool) and `kiln serve --ray` (Ray Serve)."""
