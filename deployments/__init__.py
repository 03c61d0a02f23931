"""deployments: wanflow as a Prefect service.

`setup` prepares a Prefect server for this host (GPU limits, work pool, the deployments of
prefect.yaml, the crashed-run automation), `server` finds or starts that server, `worker`
runs this host's worker under `supervisor`, which owns its processes. docs/deploy.md is the guide.
"""
