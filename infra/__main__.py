"""Pulumi entry point: the stack is built by ccat_infra.stack.deploy from the stack config."""

from ccat_infra.stack import deploy

deploy()
