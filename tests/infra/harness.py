"""Run the Pulumi program of infra/ under Pulumi's mocks and record what it would create.

Mocks are the only option here: no Pulumi CLI, engine, provider plugin or Kubernetes cluster
can run on these machines (DESIGN.md). ``pulumi.runtime.set_mocks`` replaces the engine: every
resource the program registers reaches ``RecordingMocks.new_resource`` with its inputs as the
engine would get them (secret values still wrapped as secrets), and a stack transformation
records each resource's explicit ``depends_on``. Real users run ``pulumi up``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import rpc

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
if str(INFRA) not in sys.path:
    sys.path.insert(0, str(INFRA))

# Fake secret values: they must end up only inside Kubernetes Secrets, wrapped as secrets.
SECRETS = {
    "ccat:dbPassword": "db-pw-7f3a9c1e",
    "ccat:redisPassword": "redis-pw-2b8d4e6f",
    "ccat:s3AccessKeyId": "s3-key-id-5c1a",
    "ccat:s3SecretAccessKey": "s3-secret-9e7b3d",
}
# The optional secrets of the operator notifications (not set in the default runs).
NOTIFY_SECRETS = {
    "ccat:notifyWebhookUrl": "https://chat.example.invalid/hooks/notify-tok-4d2f8b",
    "ccat:notifySmtpPassword": "smtp-pw-8a1c6e",
}


@dataclass
class Recorded:
    """One resource the program registered."""

    type: str
    name: str
    inputs: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)


class RecordingMocks(pulumi.runtime.Mocks):
    """Echo every resource's inputs back as its state, and remember them."""

    def __init__(self) -> None:
        self.resources: list[Recorded] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Recorded(args.typ, args.name, args.inputs))
        return f"{args.name}-id", args.inputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


@dataclass
class StackRun:
    """What one stack would create."""

    stack: str
    resources: list[Recorded]
    datacenter: Any
    exports: dict[str, Any]

    def of_type(self, typ: str) -> list[Recorded]:
        """Every resource of a Pulumi type, e.g. kubernetes:helm.sh/v3:Release."""
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str, name: str) -> Recorded:
        """The resource of this type and name (fails the test when missing)."""
        found = [r for r in self.of_type(typ) if r.name == name]
        assert len(found) == 1, f"{typ} {name}: {len(found)} found"
        return found[0]

    def release_values(self, name: str) -> dict[str, Any]:
        """The values of a Helm release, secret wrappers removed."""
        return unwrap(self.one("kubernetes:helm.sh/v3:Release", name).inputs["values"])


def is_secret(value: Any) -> bool:
    """Whether a recorded input is a Pulumi secret (the wire format of secret values)."""
    return isinstance(value, dict) and value.get(rpc._special_sig_key) == rpc._special_secret_sig


def unwrap(value: Any) -> Any:
    """A recorded input with every secret wrapper replaced by its value."""
    if is_secret(value):
        return unwrap(value["value"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def stack_config(stack: str) -> dict[str, Any]:
    """The ``config:`` of infra/Pulumi.<stack>.yaml."""
    data = yaml.safe_load((INFRA / f"Pulumi.{stack}.yaml").read_text())
    return dict(data.get("config") or {})


def run_stack(
    stack: str,
    overrides: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
) -> StackRun:
    """Run the program for ``stack`` (config from its YAML, plus overrides) under mocks."""
    from ccat_infra.stack import deploy

    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="ccat-data-center", stack=stack, preview=False)
    config = {**stack_config(stack), **(overrides or {})}
    secret_values = SECRETS if secrets is None else secrets
    flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    flat.update(secret_values)
    pulumi.runtime.set_all_config(flat, secret_keys=list(secret_values))

    deps: dict[tuple[str, str], list[str]] = {}

    def record(args: pulumi.ResourceTransformationArgs) -> None:
        on = args.opts.depends_on if args.opts else None
        if on is not None and not isinstance(on, list):
            on = [on]
        deps[(args.type_, args.name)] = [d._name for d in on or []]

    pulumi.runtime.register_stack_transformation(record)
    out: dict[str, Any] = {}
    exports: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> Any:
        out["dc"] = deploy()
        return pulumi.Output.from_input(None)

    original_export = pulumi.export
    pulumi.export = lambda name, value: exports.__setitem__(name, value)
    import ccat_infra.stack as stack_mod

    stack_mod.pulumi.export = pulumi.export
    try:
        program()
    finally:
        pulumi.export = original_export
        stack_mod.pulumi.export = original_export
    for r in mocks.resources:
        r.depends_on = deps.get((r.type, r.name), [])
    return StackRun(stack, mocks.resources, out["dc"], exports)
