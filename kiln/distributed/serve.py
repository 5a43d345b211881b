"""`kiln serve --ray`: the same FastAPI app on Ray Serve, so the API scales over a cluster unchanged.

Each replica is a whole kiln server (model loaded once, its own worker queue) behind Serve's HTTP proxy, which
spreads requests over the replicas (`num_replicas`, or autoscaling between a minimum and a maximum) and holds at
most `max_ongoing_requests` per replica. A1111 requests are self-contained, so any replica answers them. The job
API (`/api/v1/jobs/{id}`) and `/sdapi/v1/progress` describe the replica that answers: with more than one replica,
poll through a session-affine route or use the blocking A1111 endpoints.
"""
from __future__ import annotations

from ..errors import KilnError


def build_app(config, *, num_replicas: int | None = 1, min_replicas: int | None = None,
              max_replicas: int | None = None, max_ongoing_requests: int = 8, num_gpus: float = 0,
              num_cpus: float = 1):
    """A bound Ray Serve application serving `create_app(config)` on every replica."""
    from ray import serve

    def asgi_app():
        from ..server import create_app

        return create_app(config)

    options = dict(name="kiln", max_ongoing_requests=max_ongoing_requests,
                   ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max(lo, max_replicas or lo),
                                         "target_ongoing_requests": max(1, max_ongoing_requests // 2)}
    else:
        options["num_replicas"] = num_replicas or 1
    deployment = serve.deployment(serve.ingress(asgi_app)(), **options)
    return deployment.bind()


def run(config, *, host: str, port: int, address: str | None = None, blocking: bool = True, **deploy):
    """Start (or join) a Ray cluster, start Serve's HTTP proxy on host:port and deploy kiln at `/`."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KilnError("--ray needs Ray Serve: pip install 'ray[data,serve]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    deploy.setdefault("num_gpus", 1 if gpus else 0)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config, **deploy), name="kiln", route_prefix="/", blocking=blocking)
