"""The control plane: tenants, their volumes (created end to end: bucket or prefix, metadata
namespace with its own credentials, encryption key, format), scoped tokens, quotas, node groups,
usage and an audit log, served as an HTTP API by ``loft serve`` (see docs/CONTROL_PLANE.md)."""

ENV_CONTROL_URL = "LOFT_CONTROL_URL"  # the API's URL, for the CLI and `loft mount --control`
ENV_TOKEN = "LOFT_TOKEN"  # the token they send (the environment: no process list shows it)
