"""The control plane: tenants, their volumes (created end to end: bucket or prefix, metadata
namespace with its own credentials, encryption key, format), scoped tokens, quotas, node groups,
usage and an audit log, served as an HTTP API by ``loft serve`` (see docs/CONTROL_PLANE.md)."""
