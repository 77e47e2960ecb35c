"""Pulumi program of the CCAT data center: one ComponentResource per concern.

``config`` reads and checks the stack configuration; ``namespace``, ``database``, ``redis``,
``s3``, ``apps`` (the Helm releases) and ``ingress`` hold the components; ``stack.deploy``
wires them together in order (the migration Job completes before the API and the workers
roll out).
"""
